"""gkt-export end to end on a small trained digits checkpoint (module-scoped: built once).

The shared export uses opset 13 (TorchScript exporter: ~1 s a graph); the default opset
18 goes through the dynamo exporter (~5 s a ResNet-56 graph), checked by the slow test
here and, on a small graph, by test_export_units.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edge_runtime.learning.data import DataConfig, load_split
from edge_runtime.learning.models import EdgeResNet8, FeatureExtractor
from export.cli import main
from export.pipeline import resolve_checkpoint
from export.runtime import make_session, run
from server_hub.checkpoint import save_checkpoint
from server_hub.hub import Hub
from server_hub.models import FullResNet, build_server
from server_hub.trainer import ServerTrainConfig

DATA = DataConfig("digits", augment=False)


def fit(model, head, x, y, epochs, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(head(model(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A hub state dir with a checkpoint (2 devices) and dev0's edge state, trained to ~0.85+.

    Trained centrally for speed: export only needs weights in the checkpoint format.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does (in this process, too); restored below
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gkt-state")
    train = load_split(DATA, train=True).dataset
    x, y = train.images, train.labels
    full = fit(FullResNet(FeatureExtractor(), build_server("resnet55", 10)), lambda z: z, x, y, 2)
    edge = fit(EdgeResNet8(10), lambda out: out[0], x, y, 3)
    meta = Hub(10, ServerTrainConfig(device="cpu")).checkpoint_meta(3, DATA, None)
    ext = full.extractor.state_dict()
    meta["devices"] = ["dev0", "dev1"]
    save_checkpoint(root, meta, full.server.state_dict(),
                    {"dev0": ext, "dev1": {k: v.clone() for k, v in ext.items()}})
    dev = root / "devices" / "dev0"
    dev.mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in edge.state_dict().items()},
              str(dev / "edge.safetensors"))
    (dev / "progress.json").write_text(json.dumps({"device_id": "dev0", "completed_round": 3}))
    yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(state, tmp_path_factory):
    """dev0's graphs at opset 13 with int8, through the CLI."""
    return export_cli(state, tmp_path_factory.mktemp("onnx"), "--opset", "13")


def export_cli(state, out, *extra):
    rc = main([str(state), "--out", str(out), "--device", "dev0",
               "--edge-state", str(state / "devices" / "dev0"), "--quantize", "int8",
               "--calibration-samples", "256", "--latency-runs", "2", "--json",
               str(out / "report.json"), "-q", *extra])
    return rc, out, json.loads((out / "report.json").read_text())


def test_every_graph_is_written_and_verified(exported):
    rc, out, report = exported
    assert rc == 0 and report["passed"] and report["errors"] == []
    names = {g["name"]: g for g in report["graphs"]}
    assert set(names) == {"edge_dev0", "extractor_dev0", "composed_dev0", "server"}
    assert sorted(p.name for p in out.glob("*.onnx")) == [
        "composed_dev0.int8.onnx", "composed_dev0.onnx", "edge_dev0.int8.onnx", "edge_dev0.onnx",
        "extractor_dev0.onnx", "server.onnx"]
    assert not list(out.glob(".*partial"))
    for g in report["graphs"]:
        assert g["opset"] == 13 and g["exporter"] == "torchscript" and g["ir_version"] == 7
        assert g["parity"]["mismatches"] == 0 and g["parity"]["worst_ratio"] <= 1
        assert g["parity"]["rtol"] == 1e-4 and g["parity"]["atol"] == 1e-4
        assert set(g["latency_ms"]) == {"1", "64"}


def test_classifiers_keep_their_accuracy(exported):
    _, _, report = exported
    graphs = {g["name"]: g for g in report["graphs"]}
    test_n = len(load_split(DATA, train=False).targets)
    assert report["test_samples"] == test_n
    assert graphs["server"]["parity"]["samples"] == test_n  # H from the exported device(s)
    for name in ("edge_dev0", "composed_dev0", "server"):
        g = graphs[name]
        assert g["accuracy_onnx"] == g["accuracy_torch"] > 0.8
    assert graphs["extractor_dev0"]["accuracy_onnx"] is None
    for name in ("edge_dev0", "composed_dev0"):
        q = graphs[name]["int8"]
        assert q["accuracy_fp32"] == graphs[name]["accuracy_onnx"]
        assert q["drop_points"] <= 1.0 and q["calibration_samples"] == 256
        assert q["activations"] == "uint8" and set(q["latency_ms"]) == {"1", "64"}
    assert graphs["server"]["int8"] is None  # int8 only for the graphs a device runs whole


def test_graphs_take_any_batch_and_compose(exported):
    _, out, _ = exported
    x = load_split(DATA, train=False).dataset.images[:7].numpy()
    sessions = {n: make_session(out / f"{n}.onnx") for n in
                ("extractor_dev0", "server", "composed_dev0", "edge_dev0", "edge_dev0.int8")}
    for n in (1, 7):
        composed = run(sessions["composed_dev0"], x[:n])
        split = run(sessions["server"], run(sessions["extractor_dev0"], x[:n]))
        assert composed.shape == (n, 10)
        np.testing.assert_allclose(split, composed, rtol=1e-4, atol=1e-4)
        assert run(sessions["edge_dev0"], x[:n]).shape == (n, 10)  # logits only
        assert run(sessions["edge_dev0.int8"], x[:n]).shape == (n, 10)


def test_metadata_says_what_the_graph_is(exported):
    _, out, _ = exported
    meta = make_session(out / "composed_dev0.onnx").get_modelmeta().custom_metadata_map
    assert meta["graph"] == "composed" and meta["device"] == "dev0" and meta["round"] == "3"
    assert meta["dataset"] == "digits" and meta["server_model"] == "resnet55"
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_shape"]) == ["batch", 3, 8, 8] and meta["input_size"] == "8"
    assert json.loads(meta["normalization"])["mean"] == [0.3, 0.3, 0.3]
    assert meta["toolkit_version"] and meta["opset"] == "13"
    server = onnx.load(str(out / "server.onnx"))
    props = {p.key: p.value for p in server.metadata_props}
    assert json.loads(props["input_shape"]) == ["batch", 16, 8, 8] and "device" not in props
    int8 = {p.key: p.value for p in onnx.load(str(out / "edge_dev0.int8.onnx")).metadata_props}
    quant = json.loads(int8["quantization"])
    assert quant["format"] == "QDQ" and quant["weights"] == "int8 per-channel"
    assert int8["device"] == "dev0" and int8["opset"] == "13"


def test_files_are_portable_graphs(exported):
    """Standard ONNX ops and domains only: no onnxruntime-optimized (CPU-specific) graph."""
    _, out, _ = exported
    for path in out.glob("*.onnx"):
        model = onnx.load(str(path))
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, path.name
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, path.name
    ops = {n.op_type for n in onnx.load(str(out / "composed_dev0.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


@pytest.mark.slow
def test_default_opset_exports_with_dynamo(state, tmp_path):
    rc, _, report = export_cli(state, tmp_path)
    assert rc == 0 and report["passed"] and report["exporter"] == "dynamo"
    assert len(report["graphs"]) == 4
    for g in report["graphs"]:
        assert (g["opset"], g["ir_version"]) == (18, 8)  # IR lowered from dynamo's 10
        assert g["parity"]["mismatches"] == 0
        if g["accuracy_torch"] is not None:
            assert g["accuracy_onnx"] == g["accuracy_torch"]
        if g["int8"]:
            assert g["int8"]["drop_points"] <= 1.0


def test_checkpoint_paths_resolve_to_the_newest_round(state):
    want = resolve_checkpoint(state).path
    assert want.name == "round-0003"
    assert resolve_checkpoint(state / "checkpoints").path == want
    assert resolve_checkpoint(want).path == want


def test_failed_check_exits_nonzero_and_marks_the_file(state, tmp_path, capsys):
    """Opset 13 (TorchScript exporter, fast); a zero tolerance no float32 graph can meet."""
    rc = main([str(state), "--out", str(tmp_path), "--device", "dev0", "--opset", "13",
               "--rtol", "0", "--atol", "0", "--test-samples", "64", "--latency-runs", "1",
               "--json", str(tmp_path / "r.json"), "-q"])
    assert rc == 1
    assert "verification failed: composed_dev0" in capsys.readouterr().err
    assert (tmp_path / "composed_dev0.failed.onnx").exists()
    assert not (tmp_path / "composed_dev0.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"] and report["exporter"] == "torchscript"
    failed = {g["name"]: g for g in report["graphs"]}["composed_dev0"]
    assert failed["parity"]["mismatches"] > 0 and failed["latency_ms"] == {}


def test_unknown_device_is_a_usage_error(state, tmp_path, capsys):
    assert main([str(state), "--out", str(tmp_path), "--device", "dev9", "-q"]) == 2
    assert "dev9" in capsys.readouterr().err
