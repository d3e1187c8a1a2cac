"""What running the delivered composed model costs on each catalog device (gkt-profile).

The composed model (a device's extractor + the ResNet-55 server) is the Bottleneck
ResNet-56 of the model zoo: same layers, same multiply-adds. Per device, fp32 and int8:

    FLOPs   = forward multiply-adds x 2 per image (the zoo's fvcore count)
    memory  = process (python + numpy + PIL + onnxruntime, measured) + weights (4 bytes
              a parameter in fp32, 1 in int8) + two largest activations at batch 1
    images/s (fp32) = CPU peak x efficiency / FLOPs per image
    images/s (int8) = the fp32 figure x the int8/fp32 speed ratio measured on this x86
                      CPU by bench/bench_predict.py (batch 32): unmeasured on ARM

Pure functions of plain numbers, like estimate.py.
"""

from __future__ import annotations

from typing import Any

from device_profiles.catalog import DeviceSpec, Quantity
from device_profiles.estimate import MIB, Efficiency
from device_profiles.model_zoo import ModelProfile

COMPOSED = "resnet56"  # extractor (3->16 stem) + ResNet-55 server, layer for layer
PREDICT_PROCESS = Quantity(
    66 * MIB, "measured on x86_64: peak RSS of python + numpy + PIL + onnxruntime 1.32 "
              "with a composed model loaded and run once (no torch)")
INT8_SPEED_RATIO = Quantity(
    1.03, "measured by bench/bench_predict.py (bench/results/predict.json): fp32 / int8 "
          "latency of the composed model, batch 32, 1 thread, AMD EPYC x86 (AVX-512 VNNI)")
VARIANTS = {"fp32": 4, "int8": 1}  # bytes per weight


def inference_rows(devices: list[DeviceSpec], profile: ModelProfile,
                   eff: Efficiency, int8_ratio: Quantity = INT8_SPEED_RATIO
                   ) -> list[dict[str, Any]]:
    """One row per device and variant."""
    flops = 2 * profile.forward_macs
    act = 2 * profile.activations.largest_output_per_sample
    rows = []
    for spec in devices:
        fp32_ips = spec.cpu_peak_gflops.value * 1e9 * eff.value / flops
        for variant, per_weight in VARIANTS.items():
            memory = PREDICT_PROCESS.value + per_weight * profile.params + act
            ips = fp32_ips * (int8_ratio.value if variant == "int8" else 1.0)
            rows.append({
                "device": spec.id, "name": spec.name, "variant": variant,
                "flops_per_image": flops, "memory_bytes": memory,
                "fits": memory <= spec.ram_gib.value * 2**30,
                "images_per_second": ips, "ms_per_image": 1e3 / ips,
                "how": [f"{spec.cpu_peak_gflops.value:g} GFLOP/s peak "
                        f"({spec.cpu_peak_gflops.source})", f"efficiency {eff.value:.3f}: "
                        f"{eff.how}", PREDICT_PROCESS.source]
                       + ([f"int8 x{int8_ratio.value:.2f}: {int8_ratio.source}"]
                          if variant == "int8" else []),
            })
    return rows
