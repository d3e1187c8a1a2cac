"""Using the trained model where the data is: delivery, predict accuracy and latency, on CIFAR-10.

1. Data: N_TRAIN + N_TEST real CIFAR-10 JPEGs from the shared tarball, class-balanced
   (train/<class>/NNNN.jpg), the test ones kept as a folder of JPEG files. The same pixels
   (decoded by edge_runtime.learning.preprocess) are also written in the CIFAR-10 python
   format, so the hub-side code (export verification, evaluation) reads them with the
   real torchvision loader.
2. A short central training of the composed network (extractor + ResNet-55 server, what a
   GKT run trains in pieces) and of the edge ResNet-8, timed: the bench is about using a
   trained model, not about GKT's accuracy. Saved as a hub checkpoint of 2 devices.
3. Delivery over a real Mosquitto: ``ModelDelivery`` exports each device's composed model
   (fp32 + int8, verified) and sends it; bytes on the wire, export time, and the time from
   the start of delivery (right after the last round's checkpoint) to every device's ack.
4. ``gkt-edge predict``'s library path on the JPEG folder against the hub's evaluation
   (PyTorch on the same pixels): accuracy, and whether they agree image by image.
5. Latency on this CPU, onnxruntime, 1 thread: composed and edge, fp32 and int8 (static
   QDQ, per-channel weights, uint8 activations: what delivery sends), batch 1 and 32;
   medians of runs interleaved across the four graphs. (Per-tensor int8 was tried: the
   onnxruntime quantizer wrote duplicate node names for this model, an invalid graph.)

Usage: python bench/bench_predict.py [--train 3000 --test 1000 --epochs 2 --runs 30]
       [--json bench/results/predict.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.device.model_store import ModelReceiver
from edge_runtime.device.predict import PredictConfig, run_predict
from edge_runtime.learning.data import DataConfig, load_split, make_loader
from edge_runtime.learning.dataset_classes import CIFAR10_CLASSES
from edge_runtime.learning.models import EdgeResNet8, FeatureExtractor
from edge_runtime.learning.preprocess import Preprocess, load_image, to_rgb_u8
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from export.deliver import export_for_delivery
from export.onnx_export import ExportOptions
from export.pipeline import ExportConfig, run_export
from export.quantize import QuantConfig
from export.runtime import make_session, run
from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker, free_port
from server_hub.checkpoint import save_checkpoint
from server_hub.delivery.models import DeliveryConfig, ModelDelivery
from server_hub.hub import Hub
from server_hub.models import FullResNet, build_server
from server_hub.trainer import ServerTrainConfig

TARBALL = "/work/shared/data/cifar10-train-jpg.tar.gz"
DEVICES = ["dev0", "dev1"]


def extract(dest: Path, n_train: int, n_test: int) -> None:
    """The first n/10 files per class (by file name) of the tarball, train then test."""
    per_train, per_test = n_train // 10, n_test // 10
    wanted: dict[str, list[tarfile.TarInfo]] = {c: [] for c in CIFAR10_CLASSES}
    with tarfile.open(TARBALL) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for m in sorted(members, key=lambda m: m.name):
            cls = Path(m.name).parent.name
            if cls in wanted and len(wanted[cls]) < per_train + per_test:
                wanted[cls].append(m)
        for cls, ms in wanted.items():
            for i, m in enumerate(ms):
                split = "train" if i < per_train else "test"
                out = dest / split / cls / Path(m.name).name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())


def write_cifar_format(src: Path, root: Path) -> None:
    """train/ and test/ JPEG folders -> cifar-10-batches-py (our own pickles, read locally)."""
    spec = Preprocess(32)  # steps 1-3 only: the normalization is the loader's
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def arrays(split: str) -> dict:
        files = sorted((src / split).glob("*/*.jpg"))
        data = np.stack([to_rgb_u8(load_image(f, spec.size), spec)  # (n, 32, 32, 3)
                         for f in files])
        labels = [CIFAR10_CLASSES.index(f.parent.name) for f in files]
        return {"data": data.transpose(0, 3, 1, 2).reshape(len(files), -1), "labels": labels}

    train = arrays("train")
    parts = np.array_split(np.arange(len(train["labels"])), 5)
    for i, idx in enumerate(parts):
        batch = {"data": train["data"][idx], "labels": [train["labels"][j] for j in idx]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps(arrays("test")))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))


def fit(model: torch.nn.Module, head, loader, epochs: int, lr: float) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(head(model(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train(data: DataConfig, state: Path, epochs: int) -> dict:
    torch.manual_seed(0)
    aug = make_loader(load_split(data, True).dataset, 64, shuffle=True)
    t0 = time.perf_counter()
    full = fit(FullResNet(FeatureExtractor(), build_server("resnet55", 10)), lambda z: z, aug,
               epochs, 2e-3)
    t_full = time.perf_counter() - t0
    edge = fit(EdgeResNet8(10), lambda out: out[0], aug, epochs, 2e-3)
    t_edge = time.perf_counter() - t0 - t_full
    meta = Hub(10, ServerTrainConfig(device="cpu")).checkpoint_meta(epochs - 1, data, None)
    meta.update(devices=DEVICES, run_id="bench-predict")
    other = {k: v.clone() for k, v in full.extractor.state_dict().items()}
    save_checkpoint(state, meta, full.server.state_dict(),
                    {"dev0": full.extractor.state_dict(), "dev1": other})
    dev = state / "devices" / "dev0"
    dev.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({f"model.{k}": v.contiguous() for k, v in edge.state_dict().items()},
              str(dev / "edge.safetensors"))
    (dev / "progress.json").write_text(json.dumps({"device_id": "dev0",
                                                   "completed_round": epochs - 1}))
    return {"train_images": len(aug.dataset), "epochs": epochs,
            "composed_train_s": round(t_full, 1), "edge_train_s": round(t_edge, 1),
            "_full": full}


def deliver(state: Path, root: Path, devices_dir: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="gkt-bench-broker-"))
    folder.chmod(0o755)
    broker = ManagedBroker(BrokerConfig(str(folder), port=free_port()))
    broker.start()
    links: list[MqttLink] = []
    try:
        def link(name: str) -> MqttLink:
            links.append(MqttLink(LinkConfig(broker.url, f"bench-{name}")))
            links[-1].connect()
            return links[-1]

        hub = link("hub")
        delivery = ModelDelivery(hub, state, DeliveryConfig(str(root)), export_for_delivery)
        hub.subscribe(topics.MODEL_WILDCARD, lambda t, p: delivery.on_message(
            topics.device_from_topic(t, "model"), wire.decode_message(p, max_bytes=1 << 20)))
        for d in DEVICES:
            receiver = ModelReceiver(link(d), d, devices_dir / d)
            links[-1].subscribe(topics.down(d), lambda t, p, r=receiver: r.on_model(
                wire.decode_message(p, max_bytes=1 << 21)))
        rep = delivery.deliver(DEVICES)
    finally:
        for each in links:
            each.close()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {"round": rep.round, "export_s": rep.export_s,
            "seconds_to_all_acked": rep.seconds_to_all_acked, "acked": rep.acked,
            "bytes_on_wire": rep.bytes_on_wire, "file_bytes": rep.file_bytes}


def accuracy(full: torch.nn.Module, data: DataConfig, jpgs: Path, devices_dir: Path) -> dict:
    split = load_split(data, False)
    with torch.no_grad():
        hub_cls = torch.cat([full(x).argmax(1) for x, _ in make_loader(
            split.dataset, 256, shuffle=False)]).numpy()
    hub_acc = float((hub_cls == split.targets).mean())
    out = {"test_images": len(split.targets), "hub_accuracy": round(hub_acc, 4)}
    files = sorted(jpgs.glob("*/*.jpg"))  # the order write_cifar_format used
    for variant in ("fp32", "int8"):
        _, s = run_predict(PredictConfig((str(jpgs),), state_dir=str(devices_dir / "dev0"),
                                         int8=variant == "int8", quiet=True, threads=1))
        by_path = {p["path"]: CIFAR10_CLASSES.index(p["class"]) for p in s.predictions}
        same = sum(by_path[str(f)] == c for f, c in zip(files, hub_cls))
        out[variant] = {"predict_accuracy": round(s.accuracy, 4), "images_per_s":
                        round(s.images_per_s, 1), "agree_with_hub": f"{same}/{len(files)}"}
    return out


def latency(graphs: dict[str, Path], calib: np.ndarray, runs: int) -> dict:
    """Per graph and batch: median ms over runs interleaved across the graphs."""
    sessions = {k: make_session(p, 1) for k, p in graphs.items()}
    out: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(0)
    for b in (1, 32):
        x = calib[rng.choice(len(calib), b)]
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():  # warm-up
            for _ in range(3):
                run(s, x)
        for _ in range(runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                run(s, x)
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            out.setdefault(k, {})[str(b)] = round(statistics.median(ts) * 1e3, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", default="bench/results/predict.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="gkt-bench-predict-"))
    t0 = time.perf_counter()
    extract(work / "jpg", args.train, args.test)
    write_cifar_format(work / "jpg", work / "root")
    data = DataConfig("cifar10", str(work / "root"))
    # our own pickles, so the md5 sums of the real archive cannot match
    with mock.patch("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True):
        print(f"data ready in {time.perf_counter() - t0:.0f} s; training ...", flush=True)
        trained = train(data, work / "hub", args.epochs)
        full = trained.pop("_full")
        print(f"trained: {trained}; delivering ...", flush=True)
        delivered = deliver(work / "hub", work / "root", work / "devices")
        print(f"delivered: {delivered}", flush=True)
        plain = DataConfig("cifar10", str(work / "root"), augment=False)
        acc = accuracy(full, plain, work / "jpg" / "test", work / "devices")
        print(f"accuracy: {acc}", flush=True)
        edge = run_export(ExportConfig(
            str(work / "hub"), str(work / "edge"), edge_states=(str(work / "hub/devices/dev0"),),
            data_root=str(work / "root"), export=ExportOptions(13), quantize="int8",
            quant=QuantConfig(256), latency_batches=(), kinds=("edge",)))
        calib, _ = next(iter(make_loader(load_split(plain, True).dataset, 256, shuffle=True)))
        calib = calib.numpy()
    g = {e.name: e for e in edge.graphs}["edge_dev0"]
    dev0 = work / "devices" / "dev0" / "model"
    graphs = {"composed fp32": next(dev0.glob("*[0-9].onnx")),
              "composed int8": next(dev0.glob("*.int8.onnx")),
              "edge fp32": Path(g.path), "edge int8": Path(g.int8.path)}
    lat = latency(graphs, calib, args.runs)
    ratios = {f"{m} b{b}": round(lat[f"{m} fp32"][b] / lat[f"{m} int8"][b], 2)
              for m in ("composed", "edge") for b in ("1", "32")}
    result = {"cpu": platform.processor() or platform.machine(), "threads": 1,
              "training": trained, "delivery": delivered, "accuracy": acc,
              "edge_accuracy_fp32": g.accuracy_onnx, "latency_ms": lat,
              "int8_speedup": ratios, "total_s": round(time.perf_counter() - t0, 1)}
    print(f"{'graph':28s} {'ms b1':>8s} {'ms b32':>8s}")
    for k, v in lat.items():
        print(f"{k:28s} {v['1']:8.3f} {v['32']:8.2f}")
    print(f"int8 speed-up (fp32 ms / int8 ms): {ratios}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
