"""The package layering of DESIGN.md: server_hub -> edge_runtime only; export and
device_profiles -> both. gkt-hub reaches the device catalog through an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server_hub.simulation.speeds import PEAKS_ENTRY_POINT, catalog_peaks, profile_speeds

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {"edge_runtime": set(), "server_hub": {"edge_runtime"}}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_arrows_point_one_way(package):
    ours = {"edge_runtime", "server_hub", "export", "device_profiles"}
    wrong = {f"{p.relative_to(ROOT)} imports {m}"
             for p in (ROOT / package).rglob("*.py")
             for m in (imported_packages(p) & ours) - {package} - MAY_IMPORT[package]}
    assert not wrong, sorted(wrong)


def test_device_profiles_come_from_the_catalog_entry_point():
    from importlib.metadata import distributions

    from device_profiles.cpu_peaks import cpu_peaks

    provided = {ep.value for d in distributions() for ep in d.entry_points
                if ep.group == PEAKS_ENTRY_POINT}
    assert provided == {"device_profiles.cpu_peaks:cpu_peaks"}
    assert catalog_peaks(["jetson-orin-nano", "rpi4b"]) == [163.2, 57.6]  # rpi4b: a family
    assert cpu_peaks(["rpi4b"]) == [57.6]
    assert profile_speeds("a,b", 2, lambda ids: [10.0, 2.0]) == [1.0, 5.0]
