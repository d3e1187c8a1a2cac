"""The CPU speed settings change speed only: same numbers, same parameters, same API."""

import json
import platform
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from edge_runtime.learning.models import EdgeResNet8, GlobalAvgPool
from edge_runtime.learning.perf import channels_last_input, inference_copy
from edge_runtime.learning.train import (
    EdgeTrainConfig,
    accuracy,
    extract_features,
    make_optimizer,
    train_edge,
)
from server_hub.feature_bank import DeviceFeatures, FeatureBank
from server_hub.models import resnet55_server
from server_hub.trainer import ServerTrainConfig, server_logits, train_server

CL = torch.channels_last


def batches(n_batches: int = 2, batch: int = 8, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),
             torch.randint(0, 10, (batch,), generator=g),
             torch.arange(i * batch, (i + 1) * batch)) for i in range(n_batches)]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_global_avg_pool_matches_adaptive_avg_pool_values_and_gradients(memory_format):
    x = torch.randn(4, 8, 5, 7).contiguous(memory_format=memory_format)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = GlobalAvgPool()(a), nn.AdaptiveAvgPool2d(1)(b)
    torch.testing.assert_close(ya, yb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_channels_last_training_matches_nchw_training():
    data = batches()
    models = []
    for cl in (False, True):
        torch.manual_seed(0)
        model = EdgeResNet8(10)
        # SGD, not Adam: Adam divides by sqrt(v), so where a gradient is ~0 the last-bit
        # differences of another summation order (channels-last, or a thread count set by
        # another test) become lr-sized steps and the comparison says nothing.
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        params = list(model.parameters())
        cfg = EdgeTrainConfig(batch_size=8, channels_last=cl, reuse_memory=False)
        stats = train_edge(model, opt, data, None, cfg)
        assert stats.samples == 16
        assert all(p is q for p, q in zip(model.parameters(), params))  # optimizer still valid
        models.append(model)
    nchw, cl = models
    assert cl.extractor[0].weight.is_contiguous(memory_format=CL)
    for (name, p), q in zip(nchw.state_dict().items(), cl.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["folded", "onnxruntime"])
def test_extraction_backends_agree_with_the_eager_model(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = EdgeResNet8(10)
    train_edge(model, make_optimizer(model, 1e-2, 0), batches(), None, EdgeTrainConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches(n_batches=2, batch=5, seed=1) + batches(n_batches=1, batch=3, seed=2)
    ref = list(extract_features(model, data, "eager"))
    out = list(extract_features(model, data, backend))
    assert [len(b.ids) for b in out] == [5, 5, 3]
    for r, o in zip(ref, out):
        assert torch.equal(r.ids, o.ids) and torch.equal(r.labels, o.labels)
        assert o.features.is_contiguous()  # the codecs and the wire expect NCHW bytes
        torch.testing.assert_close(o.features, r.features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o.logits, r.logits, rtol=1e-4, atol=1e-5)
    assert not model.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # folded a copy only
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inference_copy_folds_batch_norm_and_leaves_the_model_alone():
    model = EdgeResNet8(10).train()
    copy = inference_copy(model)
    assert model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        z, h = model.eval()(x)
        z2, h2 = copy(channels_last_input(x))
    torch.testing.assert_close(z2, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h2, h, rtol=1e-4, atol=1e-5)


def test_unknown_extraction_backend_is_refused_at_configuration():
    with pytest.raises(ValueError, match="unknown extraction backend 'tensorrt'"):
        EdgeTrainConfig(extract_backend="tensorrt")


def test_accuracy_does_not_depend_on_the_evaluation_chunk():
    torch.manual_seed(0)
    model = EdgeResNet8(10)
    data = [(x, y) for x, y, _ in batches(n_batches=3, batch=10)]
    with torch.no_grad():
        expected = sum(int((model.eval()(x)[0].argmax(1) == y).sum()) for x, y in data) / 30
    assert accuracy(model, data, chunk=4) == accuracy(model, data, chunk=64) == expected


def test_server_logits_then_training_still_works():
    """Logits run under inference mode; they must not turn the parameters into inference
    tensors (converting the model to channels-last there would), or training fails."""
    torch.manual_seed(0)
    model = resnet55_server(10)
    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(12, 16, 8, 8, generator=g))
    z_nchw = server_logits(model, feats, 5, channels_last=False)
    z_cl = server_logits(model, feats, 5)
    torch.testing.assert_close(z_cl, z_nchw, rtol=1e-4, atol=1e-5)
    bank = FeatureBank()
    bank.add("d", DeviceFeatures(torch.arange(12), feats, torch.zeros(12, 10),
                                 torch.randint(0, 10, (12,), generator=g)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_server(model, opt, bank, ["d"], ServerTrainConfig(epochs=1, batch_size=6,
                                                                    device="cpu"), g)
    assert stats.samples == 12
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=CL)


PAGE_FAULTS = """
import ctypes, json, resource, torch, torch.nn.functional as F
from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.learning.perf import keep_freed_memory
torch.set_num_threads(1)
# glibc's default thresholds are dynamic (they grow after the first large free), so
# whether a default process re-faults each step varies between machines; pin the
# 128 KB defaults so that "before" is the trimming allocator everywhere.
libc = ctypes.CDLL(None)
assert libc.mallopt(-3, 128 * 1024) and libc.mallopt(-1, 128 * 1024)
model, x, y = EdgeResNet8(10), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
def faults_per_step(steps=5):
    def step():
        loss = F.cross_entropy(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    step()  # the heap may still grow once after the setting changes
    counts = []
    for _ in range(steps):  # the median step: a one-off heap growth is not per-step
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return sorted(counts)[steps // 2]
before = faults_per_step()
kept = keep_freed_memory()
print(json.dumps({"before": before, "kept": kept, "after": faults_per_step(),
                  "again": keep_freed_memory()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc allocator setting")
def test_keeping_freed_memory_stops_per_step_page_faults():
    # in a child process: the setting is process-wide and cannot be undone
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True,
                         check=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kept"] and r["again"]
    assert r["before"] > 1000  # a trimming heap re-faults each step's activations
    # medians of 5 steps: 0 after in every run seen; the mean once had a one-off residue
    assert r["after"] < r["before"] / 5


def test_folding_for_extraction_is_safe_while_another_device_trains():
    """In-process federations train devices in threads; extraction must not disturb them
    (torch.fx tracing did: it patches nn.Module.__call__ for the whole process)."""
    errors, stop = [], threading.Event()

    def train() -> None:
        torch.manual_seed(1)
        model = EdgeResNet8(10)
        opt = make_optimizer(model, 1e-3, 0)
        while not stop.is_set():
            try:
                train_edge(model, opt, batches(batch=4, size=8), None, EdgeTrainConfig())
            except Exception as err:  # reported below, failing the test
                errors.append(err)
                return

    model, data = EdgeResNet8(10), batches(batch=4, size=8)
    worker = threading.Thread(target=train)
    worker.start()
    try:
        for _ in range(40):
            list(extract_features(model, data))
    finally:
        stop.set()
        worker.join()
    assert errors == []


def test_our_bottleneck_is_torchvisions():
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    from edge_runtime.learning.models import Bottleneck, bottleneck_stage

    torch.manual_seed(0)
    ours = bottleneck_stage(16, 8, blocks=2, stride=2)
    theirs = nn.Sequential(TvBottleneck(16, 8, 2, ours[0].downsample), TvBottleneck(32, 8))
    theirs.load_state_dict(ours.state_dict())  # strict: the same keys and shapes
    assert isinstance(ours[1], Bottleneck) and Bottleneck.expansion == TvBottleneck.expansion
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_a_digits_device_imports_neither_torchvision_nor_sklearn():
    """Each costs a device RSS (~160 MB / ~210 MB); the digits ship with the package."""
    code = """
import sys
from edge_runtime.device import agent, cli
from edge_runtime.device import edge_device as device
from edge_runtime.learning import train
from edge_runtime.learning.data import DataConfig, load_split
load_split(DataConfig("digits", image_size=32), True)
print(sorted({m.split(".")[0] for m in sys.modules} & {"torchvision", "sklearn", "scipy"}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_device_round_does_not_import_torchs_compiler():
    """torch.optim's optimizers import torch._dynamo on first use (~150 MB of RSS on a 1 GB
    Pi); the device trains with AmsgradAdam instead. Train, extract + encode, evaluate, save
    and resume, train again: what gkt-edge does in a round. The last line checks the detector."""
    code = """
import sys, tempfile, pathlib, torch
from edge_runtime.device.upload import rebatch
from edge_runtime.learning.data import DataConfig, load_split, make_loader
from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.protocol.messages import feature_chunk
from edge_runtime.learning.train import EdgeTrainConfig
torch.set_num_threads(1)
train = load_split(DataConfig("digits", image_size=16), True)
plain = load_split(DataConfig("digits", image_size=16, augment=False), True)
dev = EdgeDevice("d", train, plain, list(range(64)), 10, EdgeTrainConfig(batch_size=32))
dev.train()
[feature_chunk("d", 0, "m", 0, 1, b, "q8") for b in rebatch(dev.features(), 32)]
test = load_split(DataConfig("digits", image_size=16, augment=False), False)
dev.local_accuracy(make_loader(test.dataset, 256, shuffle=False))
with tempfile.TemporaryDirectory() as d:
    dev.save(pathlib.Path(d))
    dev.load(pathlib.Path(d))
dev.train()  # a resumed optimizer steps too
compiler = lambda: sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules)
print(compiler())
torch.optim.Adam(dev.model.parameters())
print(compiler())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.strip().splitlines()
    assert out[-2] == "[]"
    assert "torch._dynamo" in out[-1]
