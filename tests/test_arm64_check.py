"""scripts/arm64-check: arguments and pure helpers (fast); the real emulated run is opt-in."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_hub.monitoring.results import RoundRecord, format_row

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "arm64-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("arm64_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("arm64_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["arm64_check"] = module  # dataclasses look their module up here
    loader.exec_module(module)
    return module


ac = load_script()


def test_help_runs_without_root_and_names_the_cache_variable():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    assert "GKT_ARM64_CACHE" in out.stdout and "--keep-venv" in out.stdout


def test_cache_dir_comes_from_the_environment_then_the_option(monkeypatch, tmp_path):
    monkeypatch.delenv(ac.CACHE_ENV, raising=False)
    cfg = ac.config_from_args(ac.build_parser().parse_args([]))
    assert cfg.cache_dir == Path(ac.DEFAULT_CACHE)
    assert cfg.rootfs == Path(ac.DEFAULT_CACHE) / "rootfs-bookworm-arm64"
    monkeypatch.setenv(ac.CACHE_ENV, str(tmp_path / "env"))
    cfg = ac.config_from_args(ac.build_parser().parse_args([]))
    assert cfg.cache_dir == tmp_path / "env"
    assert cfg.report_path == tmp_path / "env" / "report.json"
    cfg = ac.config_from_args(ac.build_parser().parse_args(["--cache-dir", str(tmp_path / "o")]))
    assert cfg.cache_dir == tmp_path / "o"


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--shard", "4", "--num-shards", "4"],
                                  ["--threads", "0"]])
def test_bad_arguments_exit_2_before_touching_anything(argv, tmp_path, capsys):
    assert ac.main(["--cache-dir", str(tmp_path / "c"), *argv]) == 2
    assert "arm64-check: error" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_guest_env_is_clean_and_pins_the_cpu_and_ca_bundle(tmp_path):
    cfg = ac.CheckConfig(cache_dir=tmp_path)
    host = {"PIP_FIND_LINKS": "/opt/wheels", "PIP_CONSTRAINT": "/etc/xdg/pip/c.txt",
            "LD_LIBRARY_PATH": "/x", "https_proxy": "http://proxy:3128"}
    env = ac.guest_env(cfg, host)
    assert env["QEMU_CPU"] == "cortex-a72"
    assert env["PIP_CERT"] == ac.GUEST_CA
    assert env["PATH"].startswith(f"{ac.GUEST_VENV}/bin:")
    assert env["https_proxy"] == "http://proxy:3128"
    assert not {"PIP_FIND_LINKS", "PIP_CONSTRAINT", "LD_LIBRARY_PATH"} & env.keys()
    assert "PIP_INDEX_URL" not in env
    env = ac.guest_env(ac.CheckConfig(cache_dir=tmp_path, index_url="https://mirror/simple"), {})
    assert env["PIP_INDEX_URL"] == "https://mirror/simple"


def test_mounts_under_finds_only_the_root_and_orders_deepest_first():
    mounts = "\n".join([
        "proc /proc proc rw 0 0",
        "proc /c/rootfs/proc proc rw 0 0",
        "udev /c/rootfs/dev devtmpfs rw 0 0",
        "devpts /c/rootfs/dev/pts devpts rw 0 0",
        "tmpfs /c/rootfs/dev/shm tmpfs rw 0 0",
        "sysfs /c/rootfs2/sys sysfs rw 0 0",  # a sibling with the same prefix
        "tmpfs /c/rootfs/with\\040space tmpfs rw 0 0",
    ])
    found = ac.mounts_under(mounts, Path("/c/rootfs"))
    assert set(found) == {"/c/rootfs/proc", "/c/rootfs/dev", "/c/rootfs/dev/pts",
                          "/c/rootfs/dev/shm", "/c/rootfs/with space"}
    assert found.index("/c/rootfs/dev/pts") < found.index("/c/rootfs/dev")
    assert found.index("/c/rootfs/dev/shm") < found.index("/c/rootfs/dev")
    assert ac.mounts_under(mounts, Path("/elsewhere")) == []


def test_forbidden_packages_are_the_export_profiling_and_gpu_stacks():
    names = ["torch", "torchvision", "numpy", "scikit-learn", "paho-mqtt", "ONNX",
             "onnxruntime", "onnxscript", "fvcore", "nvidia-cublas-cu12", "triton",
             "cuda_bindings", "gkt-edge-toolkit", "safetensors"]
    assert ac.forbidden_packages(names) == ["ONNX", "cuda_bindings", "fvcore",
                                            "nvidia-cublas-cu12", "onnxruntime", "onnxscript",
                                            "triton"]
    assert ac.forbidden_packages(["torch", "numpy", "zstandard", "tqdm"]) == []


def _fake_dist(site: Path, name: str, files: dict[str, int]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = []
    for rel, size in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        record.append(f"{rel},,{size}")
    record.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_distribution_sizes_sum_the_record_largest_first(tmp_path):
    site = tmp_path / "site-packages"
    _fake_dist(site, "small", {"small/__init__.py": 100})
    _fake_dist(site, "big", {"big/__init__.py": 10, "big/lib.so": 5000})
    rows = ac.distribution_sizes(site)
    assert [r["name"] for r in rows] == ["big", "small"]
    big, small = rows
    assert big["version"] == "1.0"
    assert 5010 <= big["bytes"] < 5010 + 1000  # + METADATA and RECORD
    assert 100 <= small["bytes"] < 100 + 1000


def test_tree_bytes_counts_files_not_symlinks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 300)
    (tmp_path / "g").write_bytes(b"y" * 50)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "f")
    assert ac.tree_bytes(tmp_path) == 350
    assert ac.tree_bytes(tmp_path / "missing") == 0


def test_parse_hub_rows_reads_what_gkt_hub_serve_prints():
    rows = [RoundRecord(0, 0.4123, 1_234_567, 45_000, 12.3, 0.5, 1.1),
            RoundRecord(1, 0.7, 1_234_567, 45_000, 9.87, None, 0.9)]
    text = "INFO noise\n" + "\n".join(format_row(r) for r in rows) + "\nINFO more\n"
    parsed = ac.parse_hub_rows(text)
    assert [p["round"] for p in parsed] == [0, 1]
    assert parsed[0]["test_accuracy"] == pytest.approx(0.4123)
    assert parsed[0]["edge_accuracy"] == pytest.approx(0.5)
    assert parsed[1]["edge_accuracy"] is None
    assert parsed[0]["upload"] == "1.2 MB" and parsed[0]["download"] == "45.0 KB"
    assert parsed[1]["seconds"] == pytest.approx(9.9)


def test_parse_device_log_collects_rounds_and_the_end():
    log = "\n".join([
        "2025 INFO gkt.edge: pi: round 0 trained locally (loss 2.301, 0 distilled) in 41.2s",
        "2025 INFO gkt.edge: pi: round 0 complete in 63.0s",
        "2025 INFO gkt.edge: pi: round 1 trained locally (loss 1.502, 359 distilled) in 40.0s",
        "2025 INFO gkt.edge: pi: round 1 complete in 60.5s",
        "2025 INFO gkt.edge: pi: hub finished the federation",
    ])
    parsed = ac.parse_device_log(log)
    assert parsed["finished"]
    assert parsed["rounds"] == [
        {"round": 0, "loss": 2.301, "distilled": 0, "train_seconds": 41.2, "round_seconds": 63.0},
        {"round": 1, "loss": 1.502, "distilled": 359, "train_seconds": 40.0,
         "round_seconds": 60.5},
    ]
    assert not ac.parse_device_log("round 0 trained locally (loss 2.3, 0 distilled) in 1.0s")[
        "finished"]


SMAPS = """\
00400000-00916000 r--p 00000000 fe:00 2146331    /rootfs/usr/bin/python3.11
Size:               5208 kB
Rss:                3000 kB
00a5f000-0748c000 rw-p 00000000 00:00 0
Rss:              108240 kB
551e5e5000-552a6a2000 rw-p 00000000 00:00 0
Rss:              197008 kB
55558ad3f000-55558c9ca000 rw-p 00000000 00:00 0    [heap]
Rss:               28036 kB
7f2199600000-7f21a15ff000 rwxp 00000000 00:00 0
Rss:              131068 kB
7f21a2228000-7f21a26a7000 r-xp 00228000 fe:00 2170890    /usr/bin/qemu-aarch64-static
Rss:                4000 kB
7ffc32dbb000-7ffc32ddc000 rw-p 00000000 00:00 0    [stack]
Rss:                 100 kB
"""


def test_rss_split_separates_qemus_own_memory_from_the_guests():
    total, emulator = ac.rss_split_kb(SMAPS)
    assert total == 3000 + 108240 + 197008 + 28036 + 131068 + 4000 + 100
    assert emulator == 28036 + 131068 + 4000 + 100
    assert ac.rss_split_kb("") == (0, 0)


def test_parse_probe_takes_the_last_result_line():
    text = "warning\nPROBE {\"a\": 1}\nPROBE {\"a\": 2}\n"
    assert ac.parse_probe(text) == {"a": 2}
    with pytest.raises(ac.CheckFailed):
        ac.parse_probe("no result here")


def test_probe_program_is_valid_python():
    compile(ac.GUEST_PROBE, "probe.py", "exec")


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("GKT_RUN_ARM64_CHECK") != "1",
                    reason="opt-in: set GKT_RUN_ARM64_CHECK=1 (root, network, ~1.2 GB, ~10 min)")
def test_real_emulated_round(tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--json",
                           str(report_path)], capture_output=True, text=True, timeout=3500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["guest"]["machine"] == "aarch64"
    assert report["forbidden"] == [] and report["guest"]["torch_cuda"] is None
