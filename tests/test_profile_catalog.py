"""The device catalog: built-in files are complete and cited; bad user files are refused
with a message that names the file and the field."""

from __future__ import annotations

import pytest

from device_profiles import cli
from device_profiles.catalog import (
    CatalogError,
    builtin_files,
    load_catalog,
    parse_file,
    select,
    spec_to_dict,
)
from device_profiles.this_machine import THIS_MACHINE_ID, this_machine

REQUIRED_DEVICES = {
    "rpi3bplus", "rpi4b-1gb", "rpi4b-2gb", "rpi4b-4gb", "rpi4b-8gb", "rpi5-4gb", "rpi5-8gb",
    "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano", "jetson-agx-orin", "intel-n100",
    "x86-laptop",
}

GOOD = """
[[device]]
id = "my-board"
name = "My board"
arch = "aarch64"
cpu = "4x Cortex-A55"
cpu_cores = { value = 4, source = "vendor datasheet v1.2" }
cpu_clock_ghz = { value = 1.8, source = "vendor datasheet v1.2" }
cpu_peak_gflops = { value = 57.6, source = "estimate: 4 x 1.8 GHz x 8" }
ram_gib = { value = 2, source = "vendor datasheet v1.2" }
os_mib = { value = 150, source = "estimate: measured with free after boot" }
"""


def test_builtin_catalog_has_every_device_with_sources():
    specs = load_catalog()
    assert REQUIRED_DEVICES <= {s.id for s in specs}
    for s in specs:
        assert s.power_w is not None and s.price_usd is not None, s.id
        for name, q in s.quantities().items():
            assert q.source and q.value > 0, (s.id, name)
        assert s.file.startswith("catalog/")


def test_estimates_are_marked_and_datasheets_are_not():
    by_id = {s.id: s for s in load_catalog()}
    nano = by_id["jetson-nano"]
    assert not nano.ram_gib.estimate  # straight from NVIDIA's data sheet
    assert nano.gpu_efficiency.estimate  # derived, says so
    assert by_id["rpi4b-4gb"].cpu_peak_gflops.estimate
    assert "4 cores x 1.8 GHz" in by_id["rpi4b-4gb"].cpu_peak_gflops.source
    assert spec_to_dict(nano)["gpu_efficiency"]["estimate"] is True


def test_common_table_is_inherited_by_ram_variants():
    by_id = {s.id: s for s in load_catalog()}
    four, eight = by_id["rpi4b-4gb"], by_id["rpi4b-8gb"]
    assert four.cpu_peak_gflops == eight.cpu_peak_gflops
    assert (four.ram_gib.value, eight.ram_gib.value) == (4, 8)
    assert four.price_usd.value < eight.price_usd.value


def test_user_catalog_dir_adds_devices(tmp_path):
    (tmp_path / "mine.toml").write_text(GOOD)
    specs = load_catalog([tmp_path])
    mine = next(s for s in specs if s.id == "my-board")
    assert mine.file.endswith("mine.toml")
    assert mine.power_w is None  # optional: energy is then n/a
    assert select(specs, "my-board, rpi5-8gb")[1].id == "rpi5-8gb"


@pytest.mark.parametrize(("edit", "field", "problem"), [
    (("cpu_clock_ghz = { value = 1.8, source = \"vendor datasheet v1.2\" }",
      "cpu_clock_ghz = { value = 1.8 }"), "cpu_clock_ghz", "missing source"),
    (("ram_gib = { value = 2,", "ram_gib = { value = \"two\","), "ram_gib", "must be a number"),
    (("ram_gib = { value = 2,", "ram_gib = { value = -2,"), "ram_gib", "positive"),
    (("os_mib = { value = 150, source = \"estimate: measured with free after boot\" }",
      "os_mib = { value = 150, source = \"estimate:\" }"), "os_mib", "how it was derived"),
    (("arch = \"aarch64\"", "arch = \"riscv\""), "arch", "must be one of"),
    (("cpu_cores = { value = 4,", "cpu_cores = { value = 4.5,"), "cpu_cores", "whole number"),
    (("cpu_cores = { value = 4, source = \"vendor datasheet v1.2\" }",
      "cpu_cores = 4"), "cpu_cores", "expected { value"),
    (("cpu = \"4x Cortex-A55\"", "cpu = \"4x Cortex-A55\"\nram_gb = 2"), "ram_gb",
     "unknown field"),
    (("cpu_peak_gflops = { value = 57.6, source = \"estimate: 4 x 1.8 GHz x 8\" }\n", ""),
     "cpu_peak_gflops", "missing required field"),
])
def test_invalid_files_name_file_and_field(edit, field, problem):
    old, new = edit
    assert old in GOOD
    with pytest.raises(CatalogError) as err:
        parse_file(GOOD.replace(old, new), "user/mine.toml")
    msg = str(err.value)
    assert "user/mine.toml" in msg and field in msg and problem in msg
    assert "my-board" in msg


def test_partial_gpu_and_efficiency_bounds_are_refused():
    gpu = GOOD + 'gpu = "tiny"\ngpu_peak_gflops = { value = 100, source = "datasheet" }\n'
    with pytest.raises(CatalogError, match="gpu_efficiency"):
        parse_file(gpu, "g.toml")
    full = gpu + ('gpu_efficiency = { value = 1.5, source = "estimate: x" }\n'
                  'gpu_runtime_mib = { value = 500, source = "estimate: y" }\n')
    with pytest.raises(CatalogError, match="fraction"):
        parse_file(full, "g.toml")


def test_bad_toml_duplicates_and_missing_dirs(tmp_path):
    with pytest.raises(CatalogError, match=r"bad\.toml: not valid TOML"):
        parse_file("[[device]\nid = ", "bad.toml")
    with pytest.raises(CatalogError, match=r"empty\.toml: needs at least one"):
        parse_file("# nothing\n", "empty.toml")
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD)
    with pytest.raises(CatalogError, match=r"b\.toml: device id 'my-board' is already defined"):
        load_catalog([tmp_path])
    with pytest.raises(CatalogError, match="not found"):
        load_catalog([tmp_path / "nope"])
    with pytest.raises(CatalogError, match="unknown device 'nope'"):
        select(load_catalog(), "nope")


def test_cli_devices_reports_invalid_file_and_exits_2(tmp_path, capsys):
    (tmp_path / "x.toml").write_text(GOOD.replace("source = \"vendor datasheet v1.2\" }",
                                                  "source = \"\" }", 1))
    assert cli.main(["devices", "--catalog", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "x.toml" in err and "cpu_cores" in err and "missing source" in err
    assert cli.main(["devices"]) == 0
    assert "13 devices valid" in capsys.readouterr().out


def test_builtin_files_are_package_data():
    names = [n for n, _ in builtin_files()]
    assert len(names) >= 9 and all(n.endswith(".toml") for n in names)


def test_this_machine_is_measured():
    spec = this_machine(runtime_mib=600)
    assert spec.id == THIS_MACHINE_ID
    assert spec.cpu_cores.value >= 1 and spec.ram_gib.value > 0
    assert spec.cpu_cores.source.startswith("measured")
    assert spec.cpu_peak_gflops.estimate
    raised = this_machine(matmul_gflops=1e6)  # a matmul above the estimate raises the peak
    assert raised.cpu_peak_gflops.value == 1e6
    assert raised.cpu_peak_gflops.source.startswith("measured")
