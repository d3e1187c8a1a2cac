"""Estimator arithmetic on a fake device and a fake model, and the calibration state file."""

from __future__ import annotations

import json

import pytest

from device_profiles.calibration import (
    Calibration,
    CalibrationPoint,
    load_calibration,
    save_calibration,
)
from device_profiles.catalog import DeviceSpec, Quantity
from device_profiles.estimate import (
    GIB,
    MALLOC_FACTOR,
    MIB,
    PROCESS_WORKSPACE,
    Efficiency,
    ModelCost,
    Settings,
    estimate,
    largest_batch,
    memory_breakdown,
    predicted_rss_growth,
    samples_per_joule,
    value_per_dollar,
)
from device_profiles.report import efficiency_for


def q(v, src="datasheet"):
    return Quantity(v, src)


BOARD = DeviceSpec(
    id="fake", name="Fake board", arch="aarch64", cpu="4x test core",
    cpu_cores=q(4), cpu_clock_ghz=q(2.0), cpu_peak_gflops=q(100.0, "estimate: 4 x 2 x 12.5"),
    ram_gib=q(1), os_mib=q(200), runtime_mib=q(300, "estimate: guess"), power_w=q(5.0),
    price_usd=q(50.0), gpu="toy", gpu_peak_gflops=q(1000.0), gpu_efficiency=q(0.2, "estimate: g"),
    gpu_runtime_mib=q(100, "estimate: h"),
)
# 1 GFLOP per sample to train, 0.25 to extract; 1 MiB per sample of batch memory
COST = ModelCost(name="toy", params=1_000_000, train_flops_per_sample=10**9,
                 forward_flops_per_sample=250_000_000, input_bytes_per_sample=12_288,
                 saved_per_sample=MIB - 12_288 - 2 * 65_536, saved_fixed=4096,
                 largest_output_per_sample=65_536)
EFF = Efficiency(0.1, "test", "x86_64")


def test_training_memory_formula():
    assert COST.model_state_bytes == 5 * 4_000_000  # weights, grads, 3 amsgrad buffers
    assert COST.batch_bytes_per_sample == MIB
    assert COST.training_bytes(8) == 20_000_000 + 4096 + 8 * MIB


def test_memory_breakdown_and_fit():
    m = memory_breakdown(BOARD, COST, batch=64, samples=1000, runtime=300 * MIB)
    assert m.os == 200 * MIB and m.runtime == 300 * MIB
    assert m.dataset == 1000 * 3072
    assert m.model_states == 20_000_000
    assert m.batch == 4096 + 64 * MIB
    torch_bytes = 20_000_000 + 4096 + 64 * MIB
    assert m.overhead == int(PROCESS_WORKSPACE.value + (MALLOC_FACTOR.value - 1) * torch_bytes)
    assert m.total == 200 * MIB + 300 * MIB + 3_072_000 + torch_bytes + m.overhead
    assert m.total - m.os - m.runtime - m.dataset == predicted_rss_growth(COST, 64)
    assert m.ram == GIB and m.fits


def test_largest_batch_is_the_last_that_fits():
    runtime = 300 * MIB
    b = largest_batch(BOARD, COST, samples=100_000, runtime=runtime)
    assert memory_breakdown(BOARD, COST, b, 100_000, runtime).fits
    assert not memory_breakdown(BOARD, COST, b + 1, 100_000, runtime).fits
    assert largest_batch(BOARD, COST, samples=100, runtime=runtime) == 100  # capped
    assert largest_batch(BOARD, COST, samples=10, runtime=2 * GIB) == 0


def test_cpu_estimate_times_energy_and_bytes():
    s = Settings(batch=32, samples=1000, epochs=2, link_mbps=8)
    e = estimate(BOARD, COST, s, EFF, "cpu", measured_runtime=0, bytes_up=10**6,
                 bytes_down=10**6)
    # 1000 samples x 1 GFLOP / (100 GFLOP/s x 0.1) = 100 s
    assert e.epoch_seconds == pytest.approx(100.0)
    assert e.extract_seconds == pytest.approx(25.0)
    assert e.transfer_seconds == pytest.approx(2.0)  # 2 MB at 8 Mbit/s
    assert e.round_seconds == pytest.approx(2 * 100 + 25 + 2)
    assert e.energy_epoch_j == pytest.approx(500.0)
    assert e.samples_per_second == pytest.approx(10.0)
    assert value_per_dollar(e) == pytest.approx(20.0)  # 10 samples/s per $50 -> per $100
    assert samples_per_joule(e) == pytest.approx(2.0)
    assert e.memory.runtime == 300 * MIB  # the catalog's runtime wins over the measured one
    assert "runtime_mib" in e.estimated_fields and "cpu_peak_gflops" in e.estimated_fields
    assert "ram_gib" not in e.estimated_fields
    assert e.trust.startswith("+-50%") and "x86_64 applied to aarch64" in e.trust


def test_gpu_estimate_uses_gpu_peak_efficiency_and_cuda_memory():
    s = Settings(batch=32, samples=1000)
    cpu = estimate(BOARD, COST, s, EFF, "cpu", 0, 0, 0)
    gpu = estimate(BOARD, COST, s, Efficiency(0.2, "cat"), "gpu", 0, 0, 0)
    assert gpu.epoch_seconds == pytest.approx(1000 * 1e9 / (1000e9 * 0.2))
    assert gpu.memory.runtime - cpu.memory.runtime == 100 * MIB
    assert gpu.trust.startswith("factor 2")
    assert "gpu_efficiency" in gpu.estimated_fields


def test_trust_levels():
    s = Settings()
    same_arch = DeviceSpec(**{**BOARD.__dict__, "arch": "x86_64"})
    assert estimate(same_arch, COST, s, EFF, "cpu", 0, 0, 0).trust.startswith("+-35%")
    assert estimate(BOARD, COST, s, EFF, "cpu", 0, 0, 0,
                    is_this_machine=True).trust.startswith("+-25%")
    assert estimate(BOARD, COST, s, Efficiency(0.1, "default"), "cpu", 0, 0,
                    0).trust.startswith("factor 3")


def test_no_price_or_power_means_not_applicable():
    bare = DeviceSpec(**{**BOARD.__dict__, "power_w": None, "price_usd": None})
    e = estimate(bare, COST, Settings(), EFF, "cpu", 0, 0, 0)
    assert e.energy_epoch_j is None and value_per_dollar(e) is None
    assert samples_per_joule(e) is None


def test_does_not_fit_is_reported_and_excluded_from_value():
    huge = ModelCost("huge", 10**8, 10**9, 10**8, 12_288, 50 * MIB, 0, MIB)
    e = estimate(BOARD, huge, Settings(batch=64), EFF, "cpu", 0, 0, 0)
    assert not e.fits and e.largest_batch == 0
    assert value_per_dollar(e) is None


def test_settings_are_validated():
    with pytest.raises(ValueError, match="batch"):
        Settings(batch=0)
    with pytest.raises(ValueError, match="link_mbps"):
        Settings(link_mbps=0)
    with pytest.raises(ValueError, match="target"):
        estimate(BOARD, COST, Settings(), EFF, "npu", 0, 0, 0)


def _cal(points):
    return Calibration(machine="Test CPU", arch="x86_64", threads=2, torch_version="2.x",
                       created="2026-01-01T00:00:00+00:00", peak_gflops=200.0,
                       peak_source="estimate: test", matmul_gflops=150.0, points=points)


def test_calibration_round_trip_and_nearest_batch(tmp_path):
    pts = [CalibrationPoint("resnet8", 16, 10, 0.05, 10**9, 20.0, 0.1),
           CalibrationPoint("resnet8", 128, 10, 0.3, 8 * 10**9, 26.7, 0.133)]
    path = save_calibration(_cal(pts), tmp_path / "state" / "cal.json")
    loaded = load_calibration(path)
    assert loaded == _cal(pts)
    pt, note = loaded.point_for("resnet8", 100)
    assert pt.batch == 128 and "calibrated at batch 128" in note
    assert loaded.point_for("resnet8", 16)[1] == ""
    assert loaded.point_for("resnet56", 16) is None
    assert load_calibration(tmp_path / "missing.json") is None


def test_broken_calibration_file_is_an_error(tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="calibrate"):
        load_calibration(bad)


def test_efficiency_sources():
    cal = _cal([CalibrationPoint("resnet8", 64, 10, 0.1, 10**9, 10.0, 0.05)])
    own = efficiency_for("resnet8", 64, cal)
    assert own.value == 0.05 and own.measured_on == "x86_64" and "Test CPU" in own.how
    borrowed = efficiency_for("resnet110", 64, cal)
    assert borrowed.value == 0.05 and "pessimistic" in borrowed.how
    default = efficiency_for("resnet8", 64, None)
    assert default.measured_on == "" and "calibrate" in default.how
