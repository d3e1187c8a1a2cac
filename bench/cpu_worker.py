"""A timing worker process for the speed benchmarks, and the client that drives it.

Process-wide settings (intra-/inter-op threads, the glibc allocator) cannot be switched
back and forth inside one process, so each setting gets its own worker. The benchmark
asks the workers in turn, one request at a time (the idle ones block on stdin), so the
variants it compares are interleaved and load from other processes hits them alike.

Requests and replies are JSON lines. Every reply has ``wall`` and ``cpu`` (seconds per
timed call; cpu is this process's CPU time, user + system, which on a shared machine is
steadier than wall time for one thread) and ``setup_s`` (build + untimed warm-up call,
compilation or export included, on the first request for a key; 0 afterwards).

The timed code is the library's: ``train_edge``, ``extract_features``, ``train_server``,
``server_logits``. BASELINE reproduces the code before the speed work (NCHW, the edge
model's AdaptiveAvgPool2d; run it in a worker started with ``tuned_allocator=False`` for
glibc's default allocator); TUNED is the library's current default.

Usage (as a worker; bench scripts start it): python bench/cpu_worker.py [--threads N]
       [--interop N] [--default-allocator]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TUNED_ALLOCATOR = False  # set once at worker start-up


def machine_info() -> dict:
    """What the numbers came from; the load average says how shared the machine was."""
    import torch

    cpu = platform.processor() or platform.machine()
    mem_gb = None
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2)}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


BASELINE = {"channels_last": False, "pool": "adaptive"}
TUNED = {"channels_last": True, "pool": "sum"}
TUNED_BF16 = TUNED | {"precision": "bf16"}  # opt-in: bf16 autocast (EdgeTrainConfig)


class Worker:
    """Client side: one worker process with fixed threads and allocator."""

    def __init__(self, threads: int = 0, interop: int = 0, tuned_allocator: bool = True) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
               "--interop", str(interop)]
        if not tuned_allocator:
            cmd.append("--default-allocator")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.info = self._read()  # the worker announces its settings once ready

    def ask(self, **request) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with code {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- worker side -------------------------------------------------------------------------

def _edge_model(name: str, pool: str, num_classes: int = 10):
    import torch
    from torch import nn

    from edge_runtime.learning.models import EdgeResNet8
    from server_hub.models import resnet56, resnet110

    class LogitsAndInput(nn.Module):
        """train_edge expects (logits, H); the FedAvg models return logits only."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor):
            return self.inner(x), x

    if name == "resnet8":
        model = EdgeResNet8(num_classes)
        if pool == "adaptive":
            model.pool = nn.AdaptiveAvgPool2d(1)  # the edge model before the speed work
        return model
    return LogitsAndInput({"resnet56": resnet56, "resnet110": resnet110}[name](num_classes))


class Runner:
    def __init__(self) -> None:
        self.cache: dict[str, Callable[[], None]] = {}

    def timed(self, key: str, build: Callable[[], Callable[[], None]], calls: int) -> dict:
        setup = 0.0
        if key not in self.cache:
            t0 = time.perf_counter()
            fn = build()
            fn()  # warm-up: first-touch of memory, oneDNN primitive creation, compilation
            setup = time.perf_counter() - t0
            self.cache[key] = fn
        fn = self.cache[key]
        wall, cpu = [], []
        for _ in range(calls):
            t0, c0 = time.perf_counter(), cpu_seconds()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)
        return {"wall": wall, "cpu": cpu, "setup_s": setup}

    def handle(self, r: dict) -> dict:
        op = r["op"]
        key = json.dumps(r | {"calls": 0}, sort_keys=True)
        builders = {"train": _train, "extract": _extract, "ort_export": _ort_export,
                    "matmul": _matmul, "load": _load,
                    "hub_train": _hub_train, "hub_logits": _hub_logits}
        return self.timed(key, lambda: builders[op](r), r.get("calls", 1))


def _batch(r: dict):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(r["batch"], 3, r.get("size", 32), r.get("size", 32), generator=g)
    y = torch.randint(0, 10, (r["batch"],), generator=g)
    return x, y, torch.arange(r["batch"])


def _train(r: dict) -> Callable[[], None]:
    """One train_edge call on one batch. Request fields: model, batch, size, channels_last,
    pool ("adaptive": the old edge pool | "sum": the current one), precision, compile."""
    import torch

    from edge_runtime.learning.train import EdgeTrainConfig, make_optimizer, train_edge

    torch.manual_seed(0)
    model = _edge_model(r["model"], r.get("pool", "sum"))
    opt = make_optimizer(model, 1e-3, 1e-4)
    cfg = EdgeTrainConfig(batch_size=r["batch"], channels_last=r["channels_last"],
                          reuse_memory=TUNED_ALLOCATOR, precision=r.get("precision", "fp32"))
    batch = [_batch(r)]
    if r.get("compile"):
        if r["channels_last"]:  # the compiled wrapper shares the parameters: convert first
            model.to(memory_format=torch.channels_last)
        compiled = torch.compile(model)
        return lambda: train_edge(compiled, opt, batch, None, cfg)
    return lambda: train_edge(model, opt, batch, None, cfg)


def _extract(r: dict) -> Callable[[], None]:
    """mode: "eager" (the model as trained, NCHW), "folded" (the library default: BN folded,
    channels-last), "onnxruntime" (a session run; the export is timed by "ort_export")."""
    import torch

    from edge_runtime.learning.models import EdgeResNet8
    from edge_runtime.learning.train import extract_features

    torch.manual_seed(0)
    model = EdgeResNet8(10).eval()
    batch = [_batch(r)]
    if r["mode"] == "onnxruntime":  # the per-batch part of ort_extract_features
        from edge_runtime.learning.ort_extract import ort_session

        sess, x = ort_session(model, batch[0][0]), batch[0][0].numpy()
        return lambda: sess.run(None, {"x": x})
    precision = r.get("precision", "fp32")
    return lambda: [b.features for b in extract_features(model, batch, r["mode"], precision)]


def _load(r: dict) -> Callable[[], None]:
    """One epoch of a device's augmented CIFAR-10 training loader over ``samples`` images
    (random files in the real format). mode: "torchvision" (DataLoader, PIL transforms per
    image: the code before) | "batched" (the library's: uint8 in memory, torch per batch)."""
    import shutil
    import tempfile

    import numpy as np
    import torchvision
    from bench_device_memory import write_fake_cifar10
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from edge_runtime.learning.data import (
        NORMALIZATION,
        DataConfig,
        WithIds,
        load_split,
        make_loader,
    )

    root = Path(tempfile.mkdtemp(prefix="gkt-bench-cifar-"))
    write_fake_cifar10(root, r["samples"], 10)
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True  # our files, not md5's
    ids, batch = np.arange(r["samples"]), r["batch"]
    if r["mode"] == "torchvision":
        tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                 transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                 transforms.Normalize(*NORMALIZATION["cifar10"])])
        ds = torchvision.datasets.CIFAR10(str(root), train=True, transform=tf)
        loader = DataLoader(WithIds(ds, ids), batch_size=batch, shuffle=True)
    else:
        split = load_split(DataConfig("cifar10", str(root)), train=True)
        loader = make_loader(WithIds(split.dataset, ids), batch, shuffle=True)
    shutil.rmtree(root)  # both datasets hold the images in memory by now
    return lambda: [b[0] for b in loader]


def _ort_export(r: dict) -> Callable[[], None]:
    """The per-round part of ort_extract_features: export and open a session."""
    import torch

    from edge_runtime.learning.models import EdgeResNet8
    from edge_runtime.learning.ort_extract import ort_session

    torch.manual_seed(0)
    model, x = EdgeResNet8(10).eval(), _batch(r)[0]
    return lambda: ort_session(model, x)


def _matmul(r: dict) -> Callable[[], None]:
    import torch

    n = r["n"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b)


def _bank(r: dict):
    import torch

    from server_hub.feature_bank import DeviceFeatures, FeatureBank

    g = torch.Generator().manual_seed(0)
    n = r["samples"]
    bank = FeatureBank()
    bank.add("d0", DeviceFeatures(torch.arange(n), torch.relu(torch.randn(n, 16, 32, 32,
                                                                           generator=g)),
                                  torch.randn(n, 10, generator=g),
                                  torch.randint(0, 10, (n,), generator=g)))
    return bank


def _hub_train(r: dict) -> Callable[[], None]:
    import torch

    from server_hub.models import build_server
    from server_hub.trainer import ServerTrainConfig, train_server

    torch.manual_seed(0)
    model = build_server(r.get("model", "resnet55"), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, amsgrad=True)
    cfg = ServerTrainConfig(epochs=1, batch_size=r["batch"], device="cpu",
                            channels_last=r["channels_last"], reuse_memory=TUNED_ALLOCATOR,
                            cpu_precision=r.get("precision", "fp32"))
    bank, gen = _bank(r), torch.Generator().manual_seed(0)
    return lambda: train_server(model, opt, bank, ["d0"], cfg, gen)


def _hub_logits(r: dict) -> Callable[[], None]:
    import torch

    from server_hub.models import build_server
    from server_hub.trainer import server_logits

    torch.manual_seed(0)
    model = build_server(r.get("model", "resnet55"), 10)
    if r["channels_last"]:
        model.to(memory_format=torch.channels_last)  # as train_server leaves it
    feats = _bank(r).get("d0").features
    return lambda: server_logits(model, feats, r["batch"], channels_last=r["channels_last"],
                                 precision=r.get("precision", "fp32"))


def serve() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--interop", type=int, default=0)
    p.add_argument("--default-allocator", action="store_true")
    args = p.parse_args()
    out, sys.stdout = sys.stdout, sys.stderr  # library prints must not corrupt the replies
    import torch

    from edge_runtime.learning.perf import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interop:
        torch.set_num_interop_threads(args.interop)
    # keep_freed_memory is process-wide: a default-allocator worker must never call it,
    # hence reuse_memory=TUNED_ALLOCATOR in every config built here.
    global TUNED_ALLOCATOR
    TUNED_ALLOCATOR = not args.default_allocator and keep_freed_memory()
    out.write(json.dumps({"threads": torch.get_num_threads(),
                          "interop": torch.get_num_interop_threads(),
                          "tuned_allocator": TUNED_ALLOCATOR}) + "\n")
    out.flush()
    runner = Runner()
    for line in sys.stdin:
        try:
            reply = runner.handle(json.loads(line))
        except Exception as err:  # report to the client, which raises; keep serving
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
