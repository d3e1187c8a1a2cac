"""Model delivery over a real broker, then `gkt-edge predict` on image files.

A lightly trained digits checkpoint (2 devices, built once): the hub service exports each
device's composed model (fp32 + int8), one device asks for it (``fetch-model``'s path),
the other gets it at the end of the run; predict on the test split written as PNG files
gives the hub's own per-device accuracy, sample for sample. Also: the metadata says all
an independent program needs, and unreadable files are reported and skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import start_broker
from polling import wait_for

from edge_runtime.device.cli import main as edge_main
from edge_runtime.device.fetch import fetch_model
from edge_runtime.device.model_store import ModelReceiver, current_model
from edge_runtime.device.predict import ModelError, PredictConfig, collect, run_predict
from edge_runtime.learning.data import DataConfig, digits_arrays, load_split, make_loader
from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.learning.preprocess import Preprocess
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.limits import max_packet_size
from edge_runtime.protocol.model_transfer import request_message
from export.deliver import export_for_delivery
from export.metadata import preprocess_of
from server_hub.checkpoint import load_checkpoint, save_checkpoint
from server_hub.delivery.models import DeliveryConfig, ModelDelivery
from server_hub.hub import Hub
from server_hub.models import FullResNet, build_server
from server_hub.service import HubService, ServiceConfig
from server_hub.trainer import ServerTrainConfig

pytestmark = pytest.mark.mqtt
DATA = DataConfig("digits", augment=False)
DEVICES = ["dev0", "dev1"]


@pytest.fixture(scope="module")
def hub_state(tmp_path_factory):
    """A hub state dir whose checkpoint holds 2 devices' extractors and a server (one short
    epoch of central training: the weights only need to be a real, non-trivial model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    train = load_split(DATA, True).dataset
    x, y = train.images, train.labels
    model = FullResNet(FeatureExtractor(), build_server("resnet55", 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(0, len(y), 48):
        loss = F.cross_entropy(model(x[i:i + 48]), y[i:i + 48])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    other = FeatureExtractor()  # dev1: another extractor, so the two models differ
    other.load_state_dict(model.extractor.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(0.9)
    meta = Hub(10, ServerTrainConfig(device="cpu")).checkpoint_meta(4, DATA, None)
    meta["devices"] = DEVICES
    meta["run_id"] = "run-test"
    save_checkpoint(root, meta, model.server.state_dict(),
                    {"dev0": model.extractor.state_dict(), "dev1": other.state_dict()})
    yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub_accuracy(hub_state):
    """The hub's own per-device evaluation (extractor_k + server on the test split)."""
    hub = Hub(10, ServerTrainConfig(device="cpu"))
    hub.restore(load_checkpoint(hub_state))
    loader = make_loader(load_split(DATA, False).dataset, 256, shuffle=False)
    return hub.evaluate(loader).per_device


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory):
    """The digits test split as 8-bit grey PNGs in class folders (what a user would have)."""
    from PIL import Image

    raw, labels = digits_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    keep = np.sort(order[:int(round(len(labels) * 0.2))])
    assert len(keep) == len(load_split(DATA, False).targets)
    root = tmp_path_factory.mktemp("pngs")
    for i in keep:
        (root / str(labels[i])).mkdir(exist_ok=True)
        pixels = np.round(raw[i].astype(np.float64) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(root / str(labels[i]) / f"{i:04d}.png")
    return root


SMALL_PAYLOAD = 16 * 1024


@pytest.fixture(scope="module")
def delivered(hub_state, tmp_path_factory):
    """A hub service with model delivery over a real broker; dev0 fetches its model on
    request, dev1 gets it at the end of the run. Returns (device state dirs, report)."""
    folder = Path(tempfile.mkdtemp(prefix="gkt-test-broker-"))
    folder.chmod(0o755)
    broker = start_broker(folder / "state")
    links = []

    def link(name: str) -> MqttLink:
        links.append(MqttLink(LinkConfig(broker.url, f"predict-{name}")))
        links[-1].connect(timeout=5)
        return links[-1]

    try:
        hub_link = link("hub")
        svc = HubService(hub_link, Hub(10, ServerTrainConfig(device="cpu")),
                         ServiceConfig(str(hub_state)), DATA, None)
        delivery = ModelDelivery(hub_link, hub_state,
                                 DeliveryConfig(max_payload=128 * 1024, ack_timeout=60),
                                 export_for_delivery)
        svc.intake.attach_delivery(delivery)  # as the hub's assembly wires it
        # dev1 takes smaller messages than the hub sends (its hello says so)
        svc.intake.known.update({"dev0": {}, "dev1": {"max_payload": SMALL_PAYLOAD}})
        svc.intake.listen()  # the hub's own upload intake (model replies: attach_delivery)
        devices = tmp_path_factory.mktemp("devices")
        states = {d: devices / d for d in DEVICES}
        got = fetch_model(link("dev0"), "dev0", states["dev0"], timeout=120,
                          max_bytes=1 << 20)
        assert set(got) == {"fp32", "int8"} and {r for r, _ in got.values()} == {4}

        receiver = ModelReceiver(link("dev1"), "dev1", states["dev1"])

        def on_down(topic: str, payload: bytes) -> None:
            msg = wire.decode_message(payload, max_bytes=max_packet_size(SMALL_PAYLOAD))
            if msg.kind == "model":
                receiver.on_model(msg)

        links[-1].subscribe(topics.down("dev1"), on_down)
        report = delivery.deliver(DEVICES)  # what RoundLoop.run does before "stop"
        yield states, report
    finally:
        for each in links:
            each.close()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_devices_get_their_models_and_predict_gives_the_hubs_accuracy(
        delivered, hub_accuracy, test_pngs, tmp_path, capsys):
    states, report = delivered
    assert report.round == 4 and report.acked == DEVICES and report.missing == []
    assert report.seconds_to_all_acked is not None
    for d in DEVICES:
        files = sum(report.file_bytes[d].values())  # zstd takes some off, headers add some
        assert 0.5 * files < report.bytes_on_wire[d] < 1.05 * files
        out = tmp_path / f"{d}.json"
        rc = edge_main(["predict", "--state-dir", str(states[d]), str(test_pngs), "--json",
                        str(out), "--top-k", "2"])
        assert rc == 0
        preds = json.loads(out.read_text())
        assert len(preds) == 359
        assert set(preds[0]) == {"path", "class", "probability", "top_k", "label"}
        assert len(preds[0]["top_k"]) == 2 and preds[0]["top_k"][0]["class"] == preds[0]["class"]
        correct = sum(p["class"] == p["label"] for p in preds)
        assert correct == round(hub_accuracy[d] * 359), (d, correct, hub_accuracy[d])
        text = capsys.readouterr().out
        assert f"accuracy {hub_accuracy[d]:.4f} on 359 labelled images" in text
        assert "images/s" in text
    assert hub_accuracy["dev0"] != hub_accuracy["dev1"]  # each device got its own model


def test_predict_agrees_with_pytorch_sample_by_sample(delivered, hub_state, test_pngs):
    """Per image, not only in total: the same class as the hub's PyTorch model."""
    states, _ = delivered
    ckpt = load_checkpoint(hub_state)
    ext = FeatureExtractor()
    ext.load_state_dict(ckpt.extractors["dev0"])
    server = build_server("resnet55", 10)
    server.load_state_dict(ckpt.server)
    split = load_split(DATA, False)
    with torch.no_grad():
        torch_cls = FullResNet(ext, server).eval()(split.dataset.images).argmax(1).numpy()
    _, summary = run_predict(PredictConfig((str(test_pngs),), state_dir=str(states["dev0"]),
                                           quiet=True))
    by_index = {int(p["path"].rsplit("/", 1)[1][:4]): int(p["class"])
                for p in summary.predictions}
    raw_order = np.sort(np.random.default_rng(0).permutation(1797)[:359])
    assert [by_index[i] for i in raw_order] == torch_cls.tolist()


def test_int8_model_is_delivered_and_predicts(delivered, test_pngs, hub_accuracy):
    states, _ = delivered
    path = current_model(states["dev1"], "int8")
    assert path is not None and path.name == "composed-r0004.int8.onnx"
    model, summary = run_predict(PredictConfig((str(test_pngs),), state_dir=str(states["dev1"]),
                                               int8=True, quiet=True))
    assert json.loads(model.meta["quantization"])["format"] == "QDQ"
    assert abs(summary.accuracy - hub_accuracy["dev1"]) <= 0.02  # export allows 1 point


def test_metadata_is_all_an_independent_program_needs(delivered, test_pngs):
    """Only onnxruntime, PIL and numpy, with what the file says (no toolkit code)."""
    from PIL import Image

    states, _ = delivered
    s = ort.InferenceSession(str(current_model(states["dev0"])),
                             providers=["CPUExecutionProvider"])
    meta = s.get_modelmeta().custom_metadata_map
    assert (meta["graph"], meta["run_id"], meta["round"], meta["device"]) == (
        "composed", "run-test", "4", "dev0")
    assert 0 < float(meta["test_accuracy"]) <= 1 and meta["test_samples"] == "359"
    pre = json.loads(meta["preprocess"])
    assert Preprocess.from_dict(pre) == preprocess_of(load_split_meta())
    assert "grey repeats its channel 3 times" in meta["channels"]
    assert "light strokes on a dark background" in meta["input_notes"]
    classes = json.loads(meta["classes"])
    png = next(test_pngs.glob("7/*.png"))
    img = Image.open(png).convert("RGB")
    assert img.size == (pre["size"], pre["size"])  # native size: no resize step needed
    x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255
    x = (x - np.array(pre["mean"], np.float32)[:, None, None]) / np.array(
        pre["std"], np.float32)[:, None, None]
    logits = s.run(None, {meta["input_name"]: x[None].astype(np.float32)})[0]
    _, summary = run_predict(PredictConfig((str(png),), state_dir=str(states["dev0"]),
                                           quiet=True))
    assert classes[int(logits.argmax())] == summary.predictions[0]["class"]


def load_split_meta() -> dict:
    return Hub(10, ServerTrainConfig(device="cpu")).checkpoint_meta(0, DATA, None)


def test_unreadable_files_are_reported_and_skipped(delivered, test_pngs, tmp_path, capsys):
    states, _ = delivered
    bad = tmp_path / "mixed"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = next(test_pngs.glob("3/*.png"))
    (bad / "truncated.png").write_bytes(good.read_bytes()[:40])
    (bad / "ok.png").write_bytes(good.read_bytes())
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label\n{good},3\nmissing.png,3\n")
    out = tmp_path / "p.json"
    rc = edge_main(["predict", "--state-dir", str(states["dev0"]), str(bad), str(manifest),
                    str(tmp_path / "nowhere.png"), "--json", str(out), "--batch-size", "2"])
    assert rc == 0
    err = capsys.readouterr().err
    for name in ("empty.png: empty file", "text.jpg: not an image", "truncated.png",
                 "missing.png: no such file", "nowhere.png: no such file"):
        assert name in err, name
    preds = json.loads(out.read_text())
    assert [p["path"].rsplit("/", 1)[1] for p in preds] == ["ok.png", good.name]
    assert preds[1]["label"] == "3" and "label" not in preds[0]
    # nothing readable at all: exit 1, still no traceback
    assert edge_main(["predict", "--state-dir", str(states["dev0"]),
                      str(bad / "empty.png")]) == 1


def test_no_usable_model_is_a_clear_usage_error(tmp_path, capsys, test_pngs):
    assert edge_main(["predict", "--state-dir", str(tmp_path), str(test_pngs)]) == 2
    assert "fetch-model" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert edge_main(["predict", "--model", str(tmp_path / "junk.onnx"), str(test_pngs)]) == 2
    assert "cannot load it" in capsys.readouterr().err
    with pytest.raises(ModelError):
        run_predict(PredictConfig((str(test_pngs),), model=str(tmp_path / "none.onnx")))


def test_folders_label_by_class_subfolder_and_manifests_by_name_or_index(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"")
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "m.txt").write_text("# comment\ncat/a.png,1\nx.png,dog\n\nx.png\n")
    notes: list[str] = []
    items, many = collect((str(tmp_path), str(tmp_path / "m.txt"), "gone"), ["dog", "cat"],
                          notes.append)
    labels = [(i.path.rsplit("/", 1)[1], i.label) for i in items]
    assert many and labels == [("a.png", "cat"), ("x.png", None), ("a.png", "cat"),
                               ("x.png", "dog"), ("x.png", None)]
    assert notes == ["skipped gone: no such file or folder"]


def test_a_model_request_before_any_checkpoint_gets_nothing_and_the_hub_keeps_going(
        broker, make_link, tmp_path, caplog):
    calls = []
    delivery = ModelDelivery(make_link(broker.url, "hub"), tmp_path, DeliveryConfig(),
                             lambda *a, **k: calls.append(a) or {})
    request = wire.decode_message(request_message("devX", "n1"), max_bytes=1 << 16)
    with caplog.at_level(logging.INFO, logger="gkt.hub"):
        delivery.on_message("devX", request)
        assert wait_for(lambda: "devX asked for its model: none yet" in caplog.text)
    assert calls == [] and delivery.models == {}
    assert delivery.deliver(["devX"]) is None  # no checkpoint: nothing to deliver


@pytest.mark.slow
def test_a_federation_over_mqtt_ends_with_every_device_holding_its_model(tmp_path, monkeypatch,
                                                                         test_pngs):
    """The whole path: hub + 2 `gkt-edge run` processes train digits over a real broker; at
    the end each device holds its composed model and predict on the PNGs gives the hub's
    evaluation of that device, sample for sample. (Minutes on a loaded 2-core machine.)"""
    from edge_runtime.learning.train import EdgeTrainConfig
    from server_hub.simulation.inproc import FederationConfig
    from server_hub.simulation.launch import simulate_mqtt

    # the entry point is in the installed package's metadata; this checkout may be newer
    monkeypatch.setattr("server_hub.delivery.models.find_exporter", lambda: export_for_delivery)
    state = tmp_path / "state"
    cfg = FederationConfig(data=DataConfig("digits"), devices=2, partition="iid", rounds=1,
                           edge=EdgeTrainConfig(batch_size=64),
                           server=ServerTrainConfig(epochs=1, device="cpu"),
                           state_dir=str(state))
    simulate_mqtt(cfg, "q8", show_progress=False, round_deadline=600)
    hub = Hub(10, ServerTrainConfig(device="cpu"))
    hub.restore(load_checkpoint(state))
    accs = hub.evaluate(make_loader(load_split(DATA, False).dataset, 256, shuffle=False))
    for d in ("dev0", "dev1"):
        _, summary = run_predict(PredictConfig((str(test_pngs),),
                                               state_dir=str(state / "devices" / d), quiet=True))
        assert summary.correct == round(accs.per_device[d] * 359)


def test_an_own_data_runs_models_are_verified_on_the_hubs_held_out_folder(
        hub_state, test_pngs, tmp_path, capsys):
    """A run on devices' own folders has no academic test split: delivery verifies (and
    calibrates int8) on the hub's --test-data folder, read with the run's preprocessing,
    and predict on that folder scores what the file says, to the sample."""
    from export.cli import main as export_main

    ckpt = load_checkpoint(hub_state)
    meta = dict(ckpt.meta, dataset="own", classes=[str(i) for i in range(10)],
                preprocess=Preprocess(8, *DATA.normalization, resize="stretch").to_dict())
    own = tmp_path / "own"
    save_checkpoint(own, meta, ckpt.server, ckpt.extractors)
    out = tmp_path / "models"
    files = export_for_delivery(str(own), ["dev0"], str(out), test_data=str(test_pngs),
                                int8=False)
    assert set(files["dev0"]) == {"fp32"}
    model, summary = run_predict(PredictConfig((str(test_pngs),), model=files["dev0"]["fp32"],
                                               quiet=True))
    assert model.meta["dataset"] == "own" and model.meta["test_samples"] == "359"
    assert summary.correct == round(float(model.meta["test_accuracy"]) * 359)
    # the same checkpoint without the folder: a clear usage error, not a traceback
    assert export_main([str(own), "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "--test-data DIR" in capsys.readouterr().err
