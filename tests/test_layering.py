"""The package layering (docs/architecture.md): which package and subpackage may import
which. server_hub -> edge_runtime only; export and device_profiles -> both; inside
edge_runtime the shared contract (protocol/) depends on nothing device- or hub-specific;
nothing but entry points and tests imports a command-line module. gkt-hub reaches the
device catalog through an entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from server_hub.simulation.speeds import PEAKS_ENTRY_POINT, catalog_peaks, profile_speeds

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "server_hub", "export", "device_profiles")
MAY_IMPORT = {"edge_runtime": set(), "server_hub": {"edge_runtime"}}
CLI_MODULES = ("server_hub.cli", "edge_runtime.device.cli", "export.cli", "device_profiles.cli")
# Entry points that parse a command line themselves (the torchrun entry of hub workers).
ENTRY_POINTS = {"server_hub/workers/launch.py"}
# No torch for the contract's wire format: a receiver validates bytes before any tensor.
TORCH_FREE = ("wire", "codecs", "schema", "topics", "errors", "limits", "device_metrics")


def imported_modules(path: Path) -> set[str]:
    """Absolute imports of ``path``: ``from a.b import c`` gives a.b and a.b.c."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def modules_of(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{p.relative_to(ROOT)} imports {m}" for p in modules_of(folder)
                  for m in imported_modules(p)
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_arrows_point_one_way(package):
    forbidden = tuple(set(PACKAGES) - {package} - MAY_IMPORT[package])
    assert not offenders(package, forbidden)


def test_the_contract_imports_nothing_device_or_hub_specific():
    sides = tuple(f"edge_runtime.{p}" for p in ("mqtt", "learning", "device", "ops"))
    assert not offenders("edge_runtime/protocol", sides + ("server_hub",))


def test_learning_knows_no_device_and_no_transport():
    assert not offenders("edge_runtime/learning", ("edge_runtime.device", "edge_runtime.mqtt"))


def test_nobody_imports_a_command_line_module():
    wrong = []
    for package in PACKAGES:
        for p in modules_of(package):
            rel = str(p.relative_to(ROOT))
            for m in imported_modules(p):
                cli = next((c for c in CLI_MODULES if m == c or m.startswith(c + ".")), None)
                own = rel.startswith(cli.replace(".", "/")) if cli else True
                if cli and not own and rel not in ENTRY_POINTS:
                    wrong.append(f"{rel} imports {m}")
    assert not wrong, sorted(wrong)


def test_the_wire_format_loads_without_torch():
    mods = ", ".join(f"edge_runtime.protocol.{m}" for m in TORCH_FREE)
    code = f"import sys, {mods}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "False"


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """The walker finds both import forms (a check that could not fail would prove nothing)."""
    bad = tmp_path / "edge_runtime" / "protocol" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("import edge_runtime.mqtt.link\nfrom server_hub.cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert offenders("edge_runtime/protocol", ("edge_runtime.mqtt", "server_hub")) == [
        "edge_runtime/protocol/bad.py imports edge_runtime.mqtt.link",
        "edge_runtime/protocol/bad.py imports server_hub.cli",
        "edge_runtime/protocol/bad.py imports server_hub.cli.main"]


def test_device_profiles_come_from_the_catalog_entry_point():
    from importlib.metadata import distributions

    from device_profiles.cpu_peaks import cpu_peaks

    provided = {ep.value for d in distributions() for ep in d.entry_points
                if ep.group == PEAKS_ENTRY_POINT}
    assert provided == {"device_profiles.cpu_peaks:cpu_peaks"}
    assert catalog_peaks(["jetson-orin-nano", "rpi4b"]) == [163.2, 57.6]  # rpi4b: a family
    assert cpu_peaks(["rpi4b"]) == [57.6]
    assert profile_speeds("a,b", 2, lambda ids: [10.0, 2.0]) == [1.0, 5.0]
