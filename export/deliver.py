"""The hub's model delivery, export side: each device's composed model, fp32 and int8.

Reached by the hub through the ``gkt_edge_toolkit.model_export`` entry point (server_hub
never imports export/). Every file returned passed ``gkt-export``'s verification: parity
with PyTorch and the checkpoint's test accuracy for fp32, at most ``max_int8_drop`` below
it for int8. A graph that fails is left out (and logged): the hub delivers nothing rather
than a model that does not match what it trained.
"""

from __future__ import annotations

import logging

from export.onnx_export import ExportOptions
from export.pipeline import ExportConfig, run_export
from export.quantize import QuantConfig

log = logging.getLogger("gkt.export")

# Opset 13 (TorchScript exporter, ~1 s a graph): per-channel int8, and it loads in every
# onnxruntime from 1.8 on, JetPack 4's included (docs/export.md, "Opset and exporter").
DELIVERY_OPSET = 13
# float64 parity on the first 256 held-out images (it was most of a device's export time);
# the accuracy check still runs PyTorch float32 and onnxruntime on all of them
PARITY_SAMPLES = 256


def export_for_delivery(checkpoint: str, devices: list[str], out_dir: str,
                        data_root: str = "data", test_data: str | None = None,
                        run_id: str | None = None,
                        int8: bool = True, calibration_samples: int = 256,
                        opset: int = DELIVERY_OPSET, threads: int = 1
                        ) -> dict[str, dict[str, str]]:
    """device -> {"fp32": path, "int8": path} of its verified composed graphs.

    Verification runs on the whole test split, or for a run on devices' own data on the
    hub's held-out folder ``test_data``: the accuracy written into each file is the hub's
    own evaluation of that device (extractor_k + server).
    """
    cfg = ExportConfig(
        checkpoint=checkpoint, out_dir=out_dir, devices=tuple(devices), data_root=data_root,
        test_data=test_data,
        export=ExportOptions(opset), quantize="int8" if int8 else None,
        quant=QuantConfig(calibration_samples), threads=threads, latency_batches=(),
        kinds=("composed",), run_id=run_id, parity_samples=PARITY_SAMPLES)
    report = run_export(cfg)
    out: dict[str, dict[str, str]] = {}
    for g in report.graphs:
        if g.error:
            log.error("model delivery: %s not delivered: %s", g.name, g.error)
            continue
        files = out[g.device] = {"fp32": g.path}
        if g.int8 is not None and g.int8.error:
            # verification working as meant: the device still gets its fp32 model
            log.warning("model delivery: %s: int8 withheld, fp32 only: %s", g.name,
                        g.int8.error)
        elif g.int8 is not None:
            files["int8"] = g.int8.path
    return out
