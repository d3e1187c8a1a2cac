"""The report: built from fixed inputs (no measuring), rendered as JSON, Markdown and HTML."""

from __future__ import annotations

import json
import re

import pytest

from device_profiles.calibration import Calibration, CalibrationPoint
from device_profiles.catalog import load_catalog
from device_profiles.estimate import Settings
from device_profiles.memory import ActivationMemory, MeasuredPeak, RuntimeFootprint
from device_profiles.model_zoo import ModelProfile
from device_profiles.plots import render_all
from device_profiles.render import render_html, render_json, render_markdown, write_markdown
from device_profiles.report import ReportInputs, build_report
from device_profiles.this_machine import this_machine
from device_profiles.wire_bytes import WireCost

MIB = 2**20


def _profile(name, role, params, macs, saved_mib, channels=3):
    return ModelProfile(
        name=name, title=f"{name} ({role})", role=role, num_classes=10,
        input_shape=(channels, 32, 32), params=params, forward_macs=int(macs * 1.06),
        forward_macs_by_operator={"conv": macs - 640, "linear": 640,
                                  "batch_norm": int(macs * 0.06)},
        forward_macs_by_module={"": int(macs * 1.06), "body": macs // 2},
        train_flops_per_sample=6 * macs, forward_flops_per_sample=2 * macs,
        activations=ActivationMemory(int(saved_mib * MIB), 4096, 262_144))


PROFILES = {
    "resnet8": _profile("resnet8", "edge", 10_586, 9_618_048, 1.9),
    "resnet55": _profile("resnet55", "server", 590_858, 86_772_224, 8.6, channels=16),
    "resnet56": _profile("resnet56", "fedavg", 591_322, 87_214_592, 8.7),
    "resnet110": _profile("resnet110", "fedavg", 1_147_738, 167_430_656, 16.6),
}
WIRE = WireCost("fp32", 23_600.0, 35_900.0, 44.0, 2_657, 65_536, "measured: test")
Q8 = WireCost("q8", 8_000.0, 10_700.0, 44.0, 2_657, 65_536, "measured: test")
RUNTIME = RuntimeFootprint(11 * MIB, 507 * MIB, 674 * MIB, "2.x")
CAL = Calibration("Test CPU", "x86_64", 2, "2.x", "2026-01-01T00:00:00+00:00", 166.0,
                  "estimate: test", 120.0,
                  [CalibrationPoint("resnet8", 64, 20, 0.18, 3_636_707_328, 20.2, 0.1217)])
PEAK = MeasuredPeak("resnet8", 64, 2, 160_350_072, 980 * MIB, 707 * MIB)


@pytest.fixture(scope="module")
def report():
    devices = load_catalog() + [this_machine(runtime_mib=674)]
    inputs = ReportInputs(Settings(batch=64), devices, PROFILES, RUNTIME, WIRE, CAL, PEAK,
                          wire_codecs={"fp32": WIRE, "q8": Q8})
    return build_report(inputs)


@pytest.fixture(scope="module")
def figures(report):
    return render_all(report)


def test_report_has_every_device_and_target(report):
    targets = {(e["device"], e["target"]) for e in report["estimates"]}
    assert ("jetson-orin-nano", "gpu") in targets and ("jetson-orin-nano", "cpu") in targets
    assert ("rpi3bplus", "cpu") in targets and ("this-machine", "cpu") in targets
    assert len(report["fedavg_estimates"]["resnet110"]) == len(report["estimates"])
    # the calibrated efficiency reaches every CPU estimate; GPUs use the catalog's
    cpu = next(e for e in report["estimates"] if e["device"] == "rpi5-4gb")
    assert cpu["efficiency"] == pytest.approx(0.1217)
    assert cpu["trust"].startswith("+-50%")
    gpu = next(e for e in report["estimates"] if e["target"] == "gpu")
    assert gpu["efficiency"] == pytest.approx(0.15)


def test_fedavg_is_heavier_and_may_not_fit(report):
    comp = report["comparison"]
    assert comp["resnet56"]["forward_macs_ratio"] == pytest.approx(9.07, abs=0.01)
    assert comp["resnet110"]["params_ratio"] == pytest.approx(108.4, abs=0.1)
    pi = {e["device"]: e for e in report["fedavg_estimates"]["resnet110"]}["rpi3bplus"]
    assert not pi["fits"] and pi["largest_batch"] < 64
    assert pi["bytes_up"] == 4 * 1_147_738


def test_json_round_trips(report):
    back = json.loads(render_json(report))
    assert back["settings"]["batch"] == 64
    assert back["measured_peak"]["error"] == pytest.approx(report["measured_peak"]["error"])
    assert back["best"]["value"]["device"]
    assert all(d["ram_gib"]["source"] for d in back["devices"])


def test_markdown_has_tables_sources_and_figure_links(report, figures, tmp_path):
    md = render_markdown(report)
    assert "| device | fits in RAM |" in md
    for d in report["devices"]:
        assert d["name"] in md
    assert "ESTIMATE - estimate:" in md and "Most for the money" in md
    assert "features q8 + zstd" in md and "features fp32 + zstd, logits, labels, ids (used" in md
    written = write_markdown(report, figures, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    for name in figures:
        assert f"](report_files/{name}.png)" in text
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written[1:])


def test_html_is_self_contained(report, figures):
    page = render_html(report, figures)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('src="data:image/png;base64,') == len(figures) == 4
    # opens offline: nothing to fetch, nothing to run
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert "jetson-agx-orin" in page or "Jetson AGX Orin" in page
    assert re.search(r'class="[^"]*\bbad"', page)  # devices that cannot train FedAvg's model


def test_unmeasured_report_says_how_to_calibrate():
    devices = load_catalog()[:2]
    r = build_report(ReportInputs(Settings(), devices, PROFILES, RUNTIME, WIRE))
    assert r["calibration"] is None and r["measured_peak"] is None
    assert all(e["trust"].startswith("factor 3") for e in r["estimates"])
    assert "gkt-profile calibrate" in render_markdown(r)


def test_inference_cost_of_the_delivered_composed_model_per_device(report):
    """gkt-profile: what running the composed model costs on each device, fp32 and int8."""
    rows = {(e["device"], e["variant"]): e for e in report["inference"]}
    assert {v for _, v in rows} == {"fp32", "int8"}
    assert {d for d, _ in rows} == {d["id"] for d in report["devices"]}
    composed = next(m for m in report["models"] if m["name"] == "resnet56")
    pi, orin = rows[("rpi4b-4gb", "fp32")], rows[("jetson-orin-nano", "fp32")]
    assert pi["flops_per_image"] == 2 * composed["forward_macs"]
    # int8 weights take a quarter of the bytes: 3 bytes a parameter less
    int8 = rows[("rpi4b-4gb", "int8")]
    assert pi["memory_bytes"] - int8["memory_bytes"] == 3 * composed["params"]
    # same efficiency (calibrated), so images/s scale with the CPU peak
    peaks = {d["id"]: d["cpu_peak_gflops"]["value"] for d in report["devices"]}
    assert orin["images_per_second"] / pi["images_per_second"] == pytest.approx(
        peaks["jetson-orin-nano"] / peaks["rpi4b-4gb"])
    assert pi["images_per_second"] == pytest.approx(
        peaks["rpi4b-4gb"] * 1e9 * 0.1217 / pi["flops_per_image"])
    assert all(e["fits"] for e in report["inference"])  # ~70 MB: every catalog device
    assert "Running the delivered composed model" in render_markdown(report)
