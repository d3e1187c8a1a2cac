"""Uplink bytes against accuracy: FedAvg, GKT at each feature codec, and each refresh policy.

Every row runs the same split, seed and rounds in-process, with every message encoded and
decoded in the wire format (so bytes are what would cross the broker, MQTT framing aside)
and the codecs' loss applied. Rows are "fedavg" or "CODEC/POLICY[/LOGITS_CODEC]"
(refresh.py; logits fp16 unless named), e.g. "fp32/full", "q8/freeze:1", "q8/full/fp32".
Writes JSON (per round and cumulative bytes, accuracy) and a PNG of test accuracy against
cumulative uplink MB, and checks the goals of docs/uplink.md.

    # CIFAR-10 JPEGs: 5,000 training images over 4 devices, 1,000 held out at the hub
    .venv/bin/python bench/bench_uplink.py --images cifar10-train-jpg.tar.gz --jobs 2
    .venv/bin/python bench/bench_uplink.py --dataset digits        # the README demo's data

The JPEG tree is read as an image-folder dataset (``--dataset cinic10`` layout:
ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg), drawn at random with the seed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_own_data import TAR  # noqa: E402

from edge_runtime.protocol.codecs import FEATURE_CODEC  # noqa: E402
from edge_runtime.protocol.refresh_policy import DEFAULT_POLICY  # noqa: E402

DEFAULT_ROW = f"{FEATURE_CODEC}/{DEFAULT_POLICY}"
LAST_ROUNDS = 3  # the accuracy goal is also judged on the mean of these
ROWS = ["fedavg", "fp32/full", DEFAULT_ROW, "q8/freeze:1", "q8/full", "q4/full", "q8/delta",
        "q8/drift:0.05", "q8/freeze:2", "q8/drift:0.05+delta"]


def extract_images(tar: Path, out: Path, n_train: int, n_test: int, seed: int) -> Path:
    """A seeded random n_train + n_test of the archive's train/<class>/*.jpg, as
    out/train/<class>/ and out/test/<class>/ (reused when already there)."""
    done = out / f".done-{n_train}-{n_test}-{seed}"
    if done.exists():
        return out
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        pick = random.Random(seed).sample(sorted(m.name for m in members), n_train + n_test)
        split = {name: "train" if i < n_train else "test" for i, name in enumerate(pick)}
        for m in members:  # in archive order: a gzip stream cannot seek back cheaply
            if m.name in split:
                dest = out / split[m.name] / Path(m.name).parent.name / Path(m.name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tf.extractfile(m).read())
    done.touch()
    return out


def run_row(row: str, args: argparse.Namespace) -> dict:
    try:
        return _run_row(row, args)
    except Exception:  # reported in the JSON; exceptions need not survive pickling
        import traceback

        print(f"{row}: failed\n{traceback.format_exc()}", flush=True)
        return {"row": row, "error": traceback.format_exc()}


def _bytes_row(row: str, cfg, args: argparse.Namespace) -> dict:
    """Bytes only, no hub training (for a box that cannot train the server on this data):
    devices train their edge model (CE; no hub logits to distil from) and upload through
    the wire into a hub that holds their maps; the downlink is logits messages of random
    logit-sized values in place of the server's. FedAvg: its framed
    weights after one local epoch, each way, per device and round."""
    import numpy as np
    import torch

    from edge_runtime.protocol.refresh_policy import RefreshPolicy
    from server_hub.hub import Hub
    from server_hub.models import FULL_MODELS
    from server_hub.simulation.inproc import (
        _train_ce,
        deliver_logits,
        device_names,
        make_devices,
        prepare,
        upload_round,
        weights_wire_bytes,
    )

    setup = prepare(cfg)
    ups, downs = [], []
    if row == "fedavg":
        from edge_runtime.learning.data import WithIds, make_loader
        from edge_runtime.learning.train import make_optimizer

        model = FULL_MODELS[cfg.fedavg_model](cfg.data.num_classes)
        ids = setup.shards[0]
        _train_ce(model, make_optimizer(model, cfg.edge.lr, cfg.edge.weight_decay),
                  make_loader(WithIds(setup.train.dataset, ids), cfg.edge.batch_size, True, 0), 1)
        per = [weights_wire_bytes(n, 0, model.state_dict()) for n in device_names(cfg.devices)]
        ups = downs = [sum(per)] * cfg.rounds
    else:
        codec, policy, *logits = row.split("/")
        from dataclasses import replace as _replace

        cfg = _replace(cfg, codec=codec, refresh=policy,
                       logits_codec=logits[0] if logits else cfg.logits_codec)
        pol = RefreshPolicy.parse(policy)
        devices = make_devices(cfg, setup)
        hub = Hub(cfg.data.num_classes, cfg.server, seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        for rnd in range(cfg.rounds):
            epochs, up, down = upload_round(hub, devices, rnd, cfg, pol)
            hub.commit_features([d.device_id for d in devices], epochs)
            for dev in devices:
                ids = hub.bank.get(dev.device_id).ids
                # stand-in server logits: devices no longer send theirs to a hub that does
                # not distil (the bank holds zeros, which compress to nothing), so
                # logit-sized normal values, which compress about as little as real ones
                z = 3 * torch.randn(len(ids), cfg.data.num_classes, generator=gen)
                down += deliver_logits(hub, dev, rnd, ids, z, cfg)
            ups.append(up)
            downs.append(down)
            print(f"  {row} round {rnd}: up {up / 1e6:.3f} MB, down {down / 1e6:.3f} MB",
                  flush=True)
    cum = list(np.cumsum(ups).tolist())
    return {"row": row, "final_accuracy": None, "upload_bytes": sum(ups),
            "download_bytes": sum(downs), "first_round_upload": ups[0],
            "last_round_upload": ups[-1], "accuracy_per_round": [None] * len(ups),
            "bytes": {"uplink_per_round": ups, "downlink_per_round": downs,
                      "uplink_cumulative": cum,
                      "downlink_cumulative": list(np.cumsum(downs).tolist())},
            "bytes_only": True}


def _own_folder_run(row: str, args: argparse.Namespace):
    """The row on bench_own_data's per-device CIFAR-10 folders and held-out folder, run as
    `gkt-hub simulate --transport inproc --device-data ... --test-data ...` runs it."""
    from bench_own_data import folder_run
    from bench_own_data import prepare as own_folders

    from server_hub.simulation.launch import simulate_inproc

    _, test, folders = own_folders(args.images, Path(args.own_work))
    cfg, plan = folder_run(test, folders, "--rounds", str(args.rounds), "--server-epochs",
                           str(args.server_epochs), "--batch-size", str(args.batch_size),
                           "--seed", str(args.seed), "--device", args.device)
    if row == "fedavg":
        return simulate_inproc(cfg, "fedavg", False, plan=plan,
                               device_data=[str(f) for f in folders])
    codec, policy, *logits = row.split("/")
    cfg = replace(cfg, codec=codec, refresh=policy,
                  logits_codec=logits[0] if logits else cfg.logits_codec)
    return simulate_inproc(cfg, "gkt", False, plan=plan, device_data=[str(f) for f in folders])


def _run_row(row: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.own_folders:
        t0 = time.perf_counter()
        return _summary(row, _own_folder_run(row, args), t0)
    from edge_runtime.learning.data import DataConfig
    from edge_runtime.learning.train import EdgeTrainConfig
    from server_hub.simulation.inproc import FederationConfig, prepare, run_fedavg, run_gkt
    from server_hub.trainer import ServerTrainConfig

    cfg = FederationConfig(
        data=DataConfig(args.dataset, args.data_root), devices=args.devices,
        partition=args.partition, rounds=args.rounds, seed=args.seed,
        edge=EdgeTrainConfig(batch_size=args.batch_size),
        server=ServerTrainConfig(epochs=args.server_epochs, batch_size=args.batch_size,
                                 device=args.device))
    t0 = time.perf_counter()
    if args.bytes_only:
        out = _bytes_row(row, cfg, args)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{row:22s} up {out['upload_bytes'] / 1e6:9.2f} MB  down "
              f"{out['download_bytes'] / 1e6:8.2f} MB (bytes only)", flush=True)
        return out
    setup = prepare(cfg)
    if row == "fedavg":
        result = run_fedavg(cfg, setup)
    else:
        codec, policy, *logits = row.split("/")
        result = run_gkt(replace(cfg, codec=codec, refresh=policy,
                                 logits_codec=logits[0] if logits else cfg.logits_codec), setup)
    return _summary(row, result, t0)


def _summary(row: str, result, t0: float) -> dict:
    d = result.to_dict()
    ups = [r.upload_bytes for r in result.rounds]
    out = {"row": row, "final_accuracy": d["final"]["test_accuracy"],
           "final_edge_accuracy": d["final"]["edge_accuracy"],
           "upload_bytes": d["final"]["upload_bytes"],
           "download_bytes": d["final"]["download_bytes"],
           "first_round_upload": ups[0], "last_round_upload": ups[-1],
           "accuracy_per_round": [r.test_accuracy for r in result.rounds],
           "bytes": d["bytes"], "codec": result.codec,
           "round_s": [r.seconds for r in result.rounds],
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{row:22s} acc {out['final_accuracy']:.4f}  up {out['upload_bytes'] / 1e6:9.2f} MB  "
          f"down {out['download_bytes'] / 1e6:8.2f} MB  round up first/last "
          f"{ups[0] / 1e6:.2f}/{ups[-1] / 1e6:.3f} MB  ({out['seconds']:.0f}s)", flush=True)
    return out


def goals(rows: dict[str, dict], warmup: int) -> dict:
    """The issue's goals for the default row, where its reference rows ran."""
    import numpy as np

    g: dict = {"default": DEFAULT_ROW}
    dflt = rows.get(DEFAULT_ROW)
    if dflt is None:
        return g
    if "fedavg" in rows:
        g["uploads_less_than_fedavg"] = dflt["upload_bytes"] < rows["fedavg"]["upload_bytes"]
        g["upload_ratio_to_fedavg"] = round(dflt["upload_bytes"] / rows["fedavg"]["upload_bytes"],
                                            4)
    if "fp32/full" in rows and dflt["final_accuracy"] is not None:
        ref = rows["fp32/full"]
        gap = 100 * (ref["final_accuracy"] - dflt["final_accuracy"])
        g["points_below_gkt_fp32"] = round(gap, 2)
        g["within_half_a_point_of_gkt_fp32"] = gap <= 0.5
        # one round's test accuracy swings by points on a small held-out set: the mean of
        # the last rounds is the steadier comparison (both are reported)
        k = min(LAST_ROUNDS, len(ref["accuracy_per_round"]))
        last = 100 * (np.mean(ref["accuracy_per_round"][-k:])
                      - np.mean(dflt["accuracy_per_round"][-k:]))
        g[f"points_below_gkt_fp32_mean_of_last_{k}_rounds"] = round(float(last), 2)
        swings = [abs(b - a) for r in (ref, dflt) for a, b in
                  zip(r["accuracy_per_round"][-k - 1:], r["accuracy_per_round"][-k:])]
        g["round_to_round_swing_points_median"] = round(100 * float(np.median(swings)), 2)
    later = dflt["bytes"]["uplink_per_round"][warmup:]
    if later:
        ratio = max(later) / dflt["bytes"]["uplink_per_round"][0]
        g["after_warmup_round_over_first"] = round(ratio, 5)
        g["after_warmup_at_most_1_20th"] = ratio <= 1 / 20
    return g


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        if r.get("bytes_only"):
            continue
        x = [b / 1e6 for b in r["bytes"]["uplink_cumulative"]]
        ax.plot(x, r["accuracy_per_round"], marker="o", ms=3, label=name,
                lw=2.5 if name == DEFAULT_ROW else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cinic10", help="cinic10 (an image-folder tree, "
                   "e.g. the CIFAR-10 JPEGs) or digits")
    p.add_argument("--images", type=Path, help="tar.gz of train/<class>/*.jpg to draw from")
    p.add_argument("--data-root", default="/tmp/bench-uplink/images")
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--server-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", nargs="+", default=ROWS)
    p.add_argument("--jobs", type=int, default=1, help="rows run at once (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per row")
    p.add_argument("--device", default="cpu", help="hub torch device: cpu | cuda | auto")
    p.add_argument("--own-folders", action="store_true",
                   help="rows on per-device folders of --images (bench_own_data.py's split: "
                        "5,000 training JPEGs over 4 devices, Dirichlet 0.5, 1,000 held out)")
    p.add_argument("--own-work", default="/tmp/gkt-bench-own-data",
                   help="where --own-folders extracts and splits the images")
    p.add_argument("--bytes-only", action="store_true",
                   help="no hub training or accuracy: measure what crosses the wire only")
    p.add_argument("--json", type=Path, default=HERE / "results" / "uplink.json")
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: recompute the goals and the plot of --json's rows")
    args = p.parse_args()
    if args.summarize:
        got = json.loads(args.json.read_text())
        done = {k: v for k, v in got["rows"].items() if "error" not in v}
        got["goals"] = goals(done, _warmup())
        args.json.write_text(json.dumps(got, indent=1) + "\n")
        plot(done, args.json.with_suffix(".png"), _title(argparse.Namespace(**got["setting"])))
        print(json.dumps(got["goals"], indent=1))
        return
    if args.own_folders:
        args.images = args.images or Path(TAR)
    elif args.images is not None:
        args.data_root = str(extract_images(args.images, Path(args.data_root),
                                            args.train_images, args.test_images, args.seed))
    t0 = time.time()
    rows: dict[str, dict] = {}
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        pending = {row: pool.apply_async(run_row, (row, args)) for row in args.rows}
        for row, res in pending.items():
            rows[row] = res.get()
            write(args, {k: v for k, v in rows.items() if "error" not in v}, t0, rows)
    print(json.dumps(goals({k: v for k, v in rows.items() if "error" not in v}, _warmup()),
                     indent=1))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


def _warmup() -> int:
    from edge_runtime.protocol.refresh_policy import RefreshPolicy

    return RefreshPolicy.parse(DEFAULT_POLICY).warmup or 1


def write(args: argparse.Namespace, rows: dict[str, dict], t0: float, all_rows: dict) -> None:
    setting = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"bench": "uplink", "setting": setting, "cpu_count": os.cpu_count(),
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "wall_seconds": round(time.time() - t0, 1), "goals": goals(rows, _warmup()),
           "rows": all_rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    if all(r.get("bytes_only") for r in rows.values()):
        return  # nothing to plot without accuracy
    plot(rows, args.json.with_suffix(".png"), _title(args))


def _title(args: argparse.Namespace) -> str:
    data = "CIFAR-10 JPEGs, own folders" if args.own_folders else args.dataset
    return (f"{data}: {args.devices} devices, {args.partition}, seed {args.seed}, "
            f"{args.rounds} rounds, {args.server_epochs} server epoch(s)")


if __name__ == "__main__":
    main()
