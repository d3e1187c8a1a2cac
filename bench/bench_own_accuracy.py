"""Accuracy per round on devices' own folders over real MQTT, next to the in-memory shard
path on the same images.

Data (bench_own_data.prepare): 5,000 CIFAR-10 training JPEGs split over 4 device folders by
Dirichlet(0.5) per class, seeded, and 1,000 held-out JPEGs for the hub.

- own data over MQTT: broker + hub (`--test-data`) + 4 `gkt-edge run --data FOLDER`
  processes that adopt the hub's run spec (`gkt-hub simulate --device-data ...`).
- shard path: the same per-device images decoded once into memory and run in-process as
  shards of one split, the way `--dataset/--shard` devices run (`simulate --transport
  inproc --device-data ...`).

Both use the same run spec (classes, 32x32, normalization measured on the held-out
images), seed, rounds and settings; the test accuracy is the paper's metric (each
device's extractor + the server on the held-out images, averaged over devices). They
should agree within run-to-run noise (the MQTT run codes features with q8, the in-process
run counts fp32).

At the end of the MQTT run every device gets its composed model; `gkt-edge predict` with
it on the held-out folder must give the hub's accuracy (the mean over devices), to the
sample.

Usage: python bench/bench_own_accuracy.py [--rounds 10] [--server-epochs 2]
       [--work /tmp/gkt-bench-own-data] [--json bench/results/own_accuracy.json]
       [--memory-from bench/results/uplink-cifar10.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_own_data import TAR, folder_run, prepare  # noqa: E402
from results_file import write_results  # noqa: E402

from server_hub.simulation.launch import simulate_inproc, simulate_mqtt  # noqa: E402


def memory_row(path: Path, args: argparse.Namespace) -> dict:
    """bench_uplink.py --own-folders's default row, if it ran with these settings."""
    from bench_uplink import DEFAULT_ROW

    got = json.loads(path.read_text())
    s = got["setting"]
    want = {"own_folders": True, "rounds": args.rounds, "server_epochs": args.server_epochs,
            "batch_size": args.batch_size, "seed": 0}
    if any(s.get(k) != v for k, v in want.items()) or DEFAULT_ROW not in got["rows"]:
        raise SystemExit(f"{path} is not a --own-folders run with {want} and row {DEFAULT_ROW}")
    row = got["rows"][DEFAULT_ROW]
    return {"test_accuracy": row["accuracy_per_round"], "round_s": row.get("round_s"),
            "seconds": row["seconds"], "from": f"{path} row {DEFAULT_ROW}"}


def predict_on_devices(state: Path, test: Path, hub_accuracy: float) -> dict:
    """`gkt-edge predict` with each device's delivered model on the hub's held-out folder;
    the mean of the devices' fp32 accuracies is the hub's metric for its last round."""
    from edge_runtime.device.predict import PredictConfig, run_predict

    out: dict = {"devices": {}}
    for dev in sorted((state / "devices").glob("dev*")):
        row = {}
        for variant in ("fp32", "int8"):
            model, got = run_predict(PredictConfig((str(test),), state_dir=str(dev),
                                                   int8=variant == "int8", quiet=True,
                                                   threads=1))
            row[variant] = {"accuracy": got.accuracy, "correct": got.correct,
                            "images": got.labelled, "images_per_s": round(got.images_per_s, 1),
                            "round": int(model.meta["round"]),
                            "file_test_accuracy": float(model.meta["test_accuracy"])}
        out["devices"][dev.name] = row
    accs = [r["fp32"]["accuracy"] for r in out["devices"].values()]
    out["mean_fp32_accuracy"] = sum(accs) / len(accs) if accs else None
    out["hub_final_accuracy"] = hub_accuracy
    out["agrees_to_the_sample"] = bool(accs) and abs(out["mean_fp32_accuracy"]
                                                     - hub_accuracy) < 0.5 / 1000 / len(accs)
    print(f"predict with the delivered models: mean fp32 accuracy "
          f"{out['mean_fp32_accuracy']:.4f}, the hub's {hub_accuracy:.4f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tar", default=TAR)
    p.add_argument("--work", default="/tmp/gkt-bench-own-data")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--server-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default="bench/results/own_accuracy.json")
    p.add_argument("--memory-from", metavar="UPLINK_JSON",
                   help="take the in-memory run from bench_uplink.py --own-folders's default "
                        "row (same folders, spec, seed and settings) instead of running it")
    p.add_argument("--predict-state", metavar="DIR",
                   help="only: predict with the models delivered in the MQTT run whose state "
                        "dir is DIR, and add the result to --json")
    args = p.parse_args()
    work = Path(args.work)
    _, test, folders = prepare(Path(args.tar), work)
    if args.predict_state:
        got = json.loads(Path(args.json).read_text())
        hub = got["runs"]["own_data_mqtt"]["test_accuracy"][-1]
        got["predict"] = predict_on_devices(Path(args.predict_state), test, hub)
        Path(args.json).write_text(json.dumps(got, indent=1))
        return
    # one spec for both paths
    cfg, plan = folder_run(test, folders, "--rounds", str(args.rounds), "--server-epochs",
                           str(args.server_epochs), "--batch-size", str(args.batch_size))
    runs = {}
    for name in ("own_data_mqtt", "shards_in_memory"):
        if name == "shards_in_memory" and args.memory_from:  # read once the MQTT run is done
            runs[name] = memory_row(Path(args.memory_from), args)
            continue
        t0 = time.perf_counter()
        if name == "own_data_mqtt":
            state = work / "mqtt-run"
            shutil.rmtree(state, ignore_errors=True)
            res = simulate_mqtt(replace(cfg, state_dir=str(state)), "q8", False, 600.0,
                                plan=plan, device_data=[str(f) for f in folders])
        else:
            res = simulate_inproc(cfg, "gkt", False, plan=plan,
                                  device_data=[str(f) for f in folders])
        runs[name] = {"test_accuracy": [r.test_accuracy for r in res.rounds],
                      "round_s": [r.seconds for r in res.rounds],
                      "class_report": res.class_report, "delivery": res.delivery,
                      "bytes": res.to_dict()["bytes"],
                      "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{'round':>5}  {'own data, MQTT':>15}  {'shards, in memory':>17}")
    a, b = runs["own_data_mqtt"]["test_accuracy"], runs["shards_in_memory"]["test_accuracy"]
    for i, (x, y) in enumerate(zip(a, b)):
        print(f"{i:5d}  {x:15.4f}  {y:17.4f}")
    out = {"devices": len(folders), "held_out": int(len(plan.test.labels)),
           "run_spec": plan.spec.to_dict(), "rounds": args.rounds,
           "server_epochs": args.server_epochs, "runs": runs,
           "final_difference": a[-1] - b[-1] if a and b else None}
    if runs["own_data_mqtt"]["delivery"]:
        out["predict"] = predict_on_devices(work / "mqtt-run", test, a[-1])
    write_results(args.json, out)


if __name__ == "__main__":
    main()
