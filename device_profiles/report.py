"""Build the hardware-selection report as one JSON-ready dict; renderers only format it.

Steps that take seconds report through ``progress``: profiling the five models (fvcore
traces), measuring the runtime footprint and the edge model's peak training memory in
fresh processes, and encoding real wire messages.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from device_profiles.calibrate import matches_this_machine
from device_profiles.calibration import Calibration
from device_profiles.catalog import DeviceSpec, spec_to_dict
from device_profiles.estimate import (
    DEFAULT_CPU_EFFICIENCY,
    DeviceEstimate,
    Efficiency,
    Settings,
    estimate,
    gpu_efficiency,
    predicted_rss_growth,
    samples_per_joule,
    value_per_dollar,
)
from device_profiles.flops import FVCORE_CONVENTION, TORCH_CONVENTION
from device_profiles.inference import COMPOSED, inference_rows
from device_profiles.memory import MeasuredPeak, RuntimeFootprint
from device_profiles.model_zoo import MODELS, ModelProfile
from device_profiles.this_machine import THIS_MACHINE_ID
from device_profiles.wire_bytes import WireCost, fedavg_round_bytes

EDGE = "resnet8"
FEDAVG = ("resnet56", "resnet110")
PAPER = {"resnet56": {"flops": 9.1, "params": 54}, "resnet110": {"flops": 17.4, "params": 105}}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ReportInputs:
    """Everything measured or loaded before the estimates are computed."""

    settings: Settings
    devices: list[DeviceSpec]
    profiles: dict[str, ModelProfile]
    runtime: RuntimeFootprint
    wire: WireCost
    calibration: Calibration | None = None
    measured_peak: MeasuredPeak | None = None
    onnx: list[dict[str, Any]] = field(default_factory=list)
    wire_codecs: dict[str, WireCost] = field(default_factory=dict)  # for comparison


def efficiency_for(model: str, batch: int, cal: Calibration | None) -> Efficiency:
    """The measured efficiency of ``model`` at ``batch`` if calibrated, else the edge model's
    (said so), else the default estimate."""
    if cal is not None:
        found = cal.point_for(model, batch)
        borrowed = ""
        if found is None:
            found = cal.point_for(EDGE, batch)
            borrowed = (f"; {EDGE}'s efficiency applied to {model} (larger convs usually run "
                        "more efficiently, so this time is pessimistic)")
        if found is not None:
            pt, note = found
            return Efficiency(
                pt.efficiency,
                f"measured by `gkt-profile calibrate` on {cal.machine} ({cal.arch}, "
                f"{cal.threads} threads, {cal.created[:10]}): the {pt.model} training step "
                f"reached {pt.achieved_gflops:.1f} of {cal.peak_gflops:.0f} GFLOP/s{note}"
                f"{borrowed}",
                cal.arch)
    return Efficiency(DEFAULT_CPU_EFFICIENCY.value, DEFAULT_CPU_EFFICIENCY.source)


def _targets(spec: DeviceSpec) -> list[str]:
    return ["gpu", "cpu"] if spec.gpu_peak_gflops is not None else ["cpu"]


def _estimate_all(inp: ReportInputs, model: str) -> list[DeviceEstimate]:
    s = inp.settings
    cost = inp.profiles[model].cost()
    if model == EDGE:
        up, down = inp.wire.round_bytes(s.samples, dense=True)
    else:
        up, down = fedavg_round_bytes(cost.params)
    cal_here = inp.calibration is not None and matches_this_machine(inp.calibration)
    out = []
    for spec in inp.devices:
        here = spec.id == THIS_MACHINE_ID
        for target in _targets(spec):
            eff = (gpu_efficiency(spec) if target == "gpu"
                   else efficiency_for(model, s.batch, inp.calibration))
            out.append(estimate(spec, cost, s, eff, target, inp.runtime.device_stack_bytes,
                                up, down, is_this_machine=here and cal_here))
    return out


def _estimate_dict(e: DeviceEstimate) -> dict[str, Any]:
    d = dataclasses.asdict(e)
    d["memory"]["total"] = e.memory.total
    d["fits"] = e.fits
    d["samples_per_second"] = e.samples_per_second
    d["samples_per_s_per_100usd"] = value_per_dollar(e)
    d["samples_per_joule"] = samples_per_joule(e)
    return d


def _model_dict(p: ModelProfile, batch: int) -> dict[str, Any]:
    cost = p.cost()
    top = {k: v for k, v in p.forward_macs_by_module.items() if k and "." not in k}
    return {
        "name": p.name, "title": p.title, "role": p.role, "num_classes": p.num_classes,
        "input_shape": list(p.input_shape), "params": p.params, "param_bytes": p.param_bytes,
        "forward_macs": p.forward_macs, "conv_linear_macs": p.conv_linear_macs,
        "forward_macs_by_operator": p.forward_macs_by_operator,
        "forward_macs_by_module": top,
        "train_flops_per_sample": p.train_flops_per_sample,
        "forward_flops_per_sample": p.forward_flops_per_sample,
        "saved_activation_bytes_per_sample": p.activations.saved_per_sample,
        "largest_output_bytes_per_sample": p.activations.largest_output_per_sample,
        "predicted_training_bytes": cost.training_bytes(batch),
        "conventions": p.conventions,
    }


def _comparison(profiles: dict[str, ModelProfile]) -> dict[str, Any]:
    edge = profiles[EDGE]
    rows = {}
    for name in FEDAVG:
        if name not in profiles:
            continue
        p = profiles[name]
        rows[name] = {
            "forward_macs_ratio": p.conv_linear_macs / edge.conv_linear_macs,
            "train_flops_ratio": p.train_flops_per_sample / edge.train_flops_per_sample,
            "params_ratio": p.params / edge.params,
            "paper": PAPER[name],
        }
    return rows


def _best(estimates: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    scored = [e for e in estimates if e.get(key) is not None and e["device"] != THIS_MACHINE_ID]
    if not scored:
        return None
    top = max(scored, key=lambda e: e[key])
    return {"device": top["device"], "name": top["name"], "target": top["target"],
            "value": top[key], "trust": top["trust"]}


def build_report(inp: ReportInputs) -> dict[str, Any]:
    s = inp.settings
    gkt = [_estimate_dict(e) for e in _estimate_all(inp, EDGE)]
    fedavg = {m: [_estimate_dict(e) for e in _estimate_all(inp, m)]
              for m in FEDAVG if m in inp.profiles}
    cal = inp.calibration
    cal_dict = None
    if cal is not None:
        cal_dict = {**dataclasses.asdict(cal), "matches_this_machine": matches_this_machine(cal)}
    edge_cost = inp.profiles[EDGE].cost()
    peak = None
    if inp.measured_peak is not None:
        m = inp.measured_peak
        pred, growth = edge_cost.training_bytes(m.batch), predicted_rss_growth(edge_cost, m.batch)
        peak = {**dataclasses.asdict(m), "predicted_bytes": pred,
                "error": m.allocator_peak_bytes / pred - 1,
                "rss_growth_bytes": m.rss_growth_bytes, "predicted_rss_growth_bytes": growth,
                "rss_growth_error": m.rss_growth_bytes / growth - 1}
    return {
        "title": "GKT edge toolkit: hardware-selection report",
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})",
        "settings": dataclasses.asdict(s),
        "conventions": {
            "forward_macs": FVCORE_CONVENTION,
            "train_flops": TORCH_CONVENTION,
            "bytes": "KiB/MiB/GiB are powers of 1024",
        },
        "calibration": cal_dict,
        "runtime": dataclasses.asdict(inp.runtime),
        "models": [_model_dict(p, s.batch) for p in inp.profiles.values()],
        "measured_peak": peak,
        "onnx": inp.onnx,
        "wire": dataclasses.asdict(inp.wire),
        "wire_codecs": {k: dataclasses.asdict(v) for k, v in inp.wire_codecs.items()},
        "comparison": _comparison(inp.profiles),
        "devices": [spec_to_dict(d) for d in inp.devices],
        "estimates": gkt,
        "fedavg_estimates": fedavg,
        # the delivered composed model, run with gkt-edge predict (docs/predict.md)
        "inference": (inference_rows(inp.devices, inp.profiles[COMPOSED],
                                     efficiency_for(COMPOSED, 1, cal))
                      if COMPOSED in inp.profiles else []),
        "best": {
            "value": _best(gkt, "samples_per_s_per_100usd"),
            "value_cpu": _best([e for e in gkt if e["target"] == "cpu"],
                               "samples_per_s_per_100usd"),
            "energy": _best(gkt, "samples_per_joule"),
            "speed": _best([e for e in gkt if e["fits"]], "samples_per_second"),
        },
    }


def collect_inputs(settings: Settings, devices: Sequence[DeviceSpec],
                   calibration: Calibration | None, measure: bool, progress: Progress,
                   onnx_paths: Sequence[str] = (), models: Sequence[str] = tuple(MODELS),
                   ) -> ReportInputs:
    """Profile the models and measure what the report needs (seconds to a minute)."""
    from device_profiles.memory import measure_training_peak, runtime_footprint
    from device_profiles.model_zoo import profile_model
    from device_profiles.onnx_graph import onnx_profile
    from device_profiles.wire_bytes import measure_all

    profiles = {}
    for name in models:
        progress(f"profiling {name} (fvcore trace, FlopCounterMode, saved tensors)")
        profiles[name] = profile_model(name)
    progress("runtime footprint: RSS of fresh python / import torch / device stack")
    runtime = runtime_footprint()
    progress("bytes on the wire: encoding real feature chunks with every codec")
    codecs = measure_all()
    peak = None
    if measure:
        progress(f"peak training memory of {EDGE} at batch {settings.batch} (fresh process)")
        peak = measure_training_peak(EDGE, settings.batch)
    onnx = []
    for path in onnx_paths:
        progress(f"reading {path}")
        onnx.append(dataclasses.asdict(onnx_profile(path)))
    return ReportInputs(settings, list(devices), profiles, runtime, codecs[settings.codec],
                        calibration, peak, onnx, codecs)
