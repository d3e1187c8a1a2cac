"""The benchmark suite's plumbing: the timing worker and run_all's collection and tables."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import cpu_worker  # noqa: E402
import run_all  # noqa: E402
import uplink_seeds  # noqa: E402


def test_worker_times_the_library_training_step_in_its_own_process():
    w = cpu_worker.Worker(threads=1)
    try:
        assert w.info["threads"] == 1
        r = w.ask(op="train", model="resnet8", batch=4, size=8, calls=2, **cpu_worker.TUNED)
        assert len(r["wall"]) == len(r["cpu"]) == 2 and r["setup_s"] > 0
        again = w.ask(op="train", model="resnet8", batch=4, size=8, calls=1, **cpu_worker.TUNED)
        assert again["setup_s"] == 0  # built once, then reused
        with pytest.raises(RuntimeError, match="KeyError"):
            w.ask(op="train", model="resnet9", batch=4, size=8, calls=1, **cpu_worker.TUNED)
        assert w.ask(op="matmul", n=64, calls=1)["wall"][0] > 0  # still serving after an error
    finally:
        w.close()


def test_tables_finds_nested_rows_and_renders_them():
    result = {"batch": 64, "rows": [{"model": "a", "ms": 123.456, "all": [1, 2]},
                                    {"model": "b|c", "ms": 0.01234, "extra": True}],
              "sizes": [{"size": 32, "rows": [{"codec": "q8", "bytes": 123456}]}]}
    found = dict(run_all.tables(result))
    assert set(found) == {"rows", "sizes", "sizes[0].rows"}
    lines = run_all.markdown_table(found["rows"])
    assert lines[0] == "| model | ms | extra |"  # list-valued columns are left out
    assert lines[2] == "| a | 123 |  |"
    assert lines[3] == "| b\\|c | 0.0123 | True |"
    assert run_all.markdown_table(found["sizes[0].rows"])[2] == "| q8 | 123,456 |"


def test_run_one_records_results_and_failures(tmp_path):
    good = tmp_path / "bench_good.py"
    good.write_text("import json, sys\n"
                    "path = sys.argv[sys.argv.index('--json') + 1]\n"
                    "open(path, 'w').write(json.dumps({'rows': [{'x': 1}]}))\n")
    bad = tmp_path / "bench_bad.py"
    bad.write_text("raise SystemExit('broken on purpose')\n")
    ok = run_all.run_one("good", good, [], tmp_path, timeout=60)
    assert ok["ok"] and ok["result"] == {"rows": [{"x": 1}]}
    failed = run_all.run_one("bad", bad, [], tmp_path, timeout=60)
    assert not failed["ok"] and "broken on purpose" in failed["error_tail"]
    md = tmp_path / "RESULTS.md"
    info = {"cpu": "cpu", "cores": 2, "memory_gb": 1.0, "machine": "x", "python": "3",
            "torch": "t", "load_average": 0.5}
    skipped = {"skipped": "needs a CUDA GPU", "ok": True}
    run_all.write_markdown(md, info, {"good": ok, "bad": failed, "gpu": skipped}, True, "now",
                           1.0, tmp_path / "quick" / "summary.json")
    text = md.read_text()
    assert "| x |" in text and "**failed**" in text and "cpu, 2 cores" in text
    assert "## gpu\n\nnot run: needs a CUDA GPU" in text
    assert "[quick/summary.json](quick/summary.json)" in text
    json.dumps({"good": ok, "bad": failed})  # summary.json must be plain JSON


def test_every_benchmark_script_is_discovered():
    names = run_all.discover()
    assert {"edge_cost", "edge_tuning", "device_memory", "hub"} <= set(names)
    assert all(p.name.startswith("bench_") for p in names.values())


def test_uplink_seeds_pairs_rows_by_seed(tmp_path):
    def run(seed, rows):
        f = tmp_path / f"s{seed}.json"
        f.write_text(json.dumps({"bench": "uplink", "setting": {"seed": seed}, "rows": {
            name: {"final_accuracy": acc[-1], "accuracy_per_round": acc, "upload_bytes": 2e6}
            for name, acc in rows.items()}}))
        return str(f)

    files = [run(0, {"ref": [0.1, 0.3, 0.4, 0.5], "new": [0.1, 0.3, 0.4, 0.49]}),
             run(1, {"ref": [0.1, 0.2, 0.2, 0.2], "new": [0.1, 0.2, 0.2, 0.23]}),
             run(2, {"ref": [0.1, 0.2, 0.2, 0.2]})]  # "new" did not run seed 2: unpaired
    own_output = tmp_path / "seeds.json"  # what a glob like uplink-*seed*.json also finds
    own_output.write_text(json.dumps({"bench": "uplink_seeds", "rows": {}}))
    table = uplink_seeds.paired(uplink_seeds.load([*files, str(own_output)]), "ref")
    new = table["new"]
    assert new["seeds"] == [0, 1] and new["final_points"] == [-1.0, 3.0]
    assert new["final_mean"] == 1.0 and new["final_se"] == 2.0
    assert new["last3_points"] == [-0.33, 1.0] and new["mean_upload_mb"] == 2.0


def test_every_benchmark_script_imports():
    """A refactor that moves a name a benchmark imports breaks it only when someone runs
    it, maybe sessions later; importing each bench_*.py (one interpreter) catches that."""
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
            "[importlib.import_module(n) for n in sys.argv[2:]]")
    names = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    assert len(names) >= 15
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH), *names],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_quick_run_leaves_out_the_hour_long_and_the_unrunnable(monkeypatch, tmp_path):
    assert "left out of --quick" in run_all.skip_reason("own_accuracy", quick=True)
    assert run_all.skip_reason("edge_cost", quick=True) is None
    monkeypatch.setattr(run_all, "ARCHIVE", str(tmp_path / "absent.tar.gz"))
    assert "archive" in run_all.skip_reason("predict", quick=True)
    import torch

    assert (run_all.skip_reason("hub_gpu", quick=False) is None) == torch.cuda.is_available()
