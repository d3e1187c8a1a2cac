"""The hub on real image folders: held-out data read by class name, per-class accuracy and
the confusion matrix in the run JSON, and simulations on per-device folders (split from
one folder, or given), baselines on exactly the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from own_data_files import write_digits

from edge_runtime.learning.preprocess import Preprocess
from server_hub.cli.main import main as hub_main
from server_hub.run.evaluation import class_report
from server_hub.run.test_data import HeldOutError, channel_stats, read_test_folder

DIGITS = tuple(str(d) for d in range(10))


def test_test_folder_is_labelled_by_the_runs_class_names(tmp_path):
    write_digits(tmp_path / "t", 2, classes=[3, 7])
    (tmp_path / "t" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n oops")
    (tmp_path / "t" / "0").mkdir()  # an empty class folder is fine
    got = read_test_folder(tmp_path / "t", DIGITS, Preprocess(8))
    assert got.images.shape == (4, 8, 8, 3) and got.images.dtype == np.uint8
    assert sorted(got.labels.tolist()) == [3, 3, 7, 7]  # indices in the run's order
    assert len(got.skipped) == 1 and "broken.png" in got.skipped[0]
    with pytest.raises(HeldOutError, match=r"does not know: \['7'\]"):
        read_test_folder(tmp_path / "t", ("0", "3"), Preprocess(8))
    with pytest.raises(HeldOutError, match="no class subfolders"):
        read_test_folder(tmp_path / "t" / "0", DIGITS, Preprocess(8))


def test_channel_stats_are_per_channel_in_unit_range():
    img = np.zeros((2, 4, 4, 3), np.uint8)
    img[0, ..., 0] = 255  # red: half the pixels at 1.0
    img[..., 2] = 51  # blue: 0.2 everywhere, std floored
    mean, std = channel_stats(img)
    assert mean == (0.5, 0.0, 0.2)
    assert std[0] == 0.5 and std[1] == 0.001 and std[2] == 0.001


def test_class_report_is_recall_per_true_class():
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    rep = class_report(cm, ["a", "b", "c"])
    assert rep["per_class_accuracy"] == [0.75, None, 0.5]  # b: no test image
    assert rep["confusion"] == cm.tolist() and rep["classes"] == ["a", "b", "c"]


def test_split_data_command_links_every_file_once(tmp_path, capsys):
    write_digits(tmp_path / "all", 6)
    dest = tmp_path / "split"
    argv = ["split-data", str(tmp_path / "all"), str(dest), "--devices", "3",
            "--partition", "dirichlet:0.5", "--seed", "1"]
    assert hub_main(argv) == 0
    files = [p for p in dest.glob("device-*/*/*")]
    assert len(files) == 60 and len({p.resolve() for p in files}) == 60
    assert sorted(p.name for p in dest.iterdir()) == ["device-0", "device-1", "device-2",
                                                      "split.json"]
    assert "device-0:" in capsys.readouterr().out
    assert hub_main(argv) == 2  # never writes into a used folder
    assert "not empty" in capsys.readouterr().err


def test_simulate_splits_a_folder_and_reports_per_class_accuracy(tmp_path):
    write_digits(tmp_path / "train", 12)
    write_digits(tmp_path / "test", 4, start=12)
    out = tmp_path / "run.json"
    assert hub_main(["simulate", "--transport", "inproc", "--split-data",
                     str(tmp_path / "train"), "--test-data", str(tmp_path / "test"),
                     "--devices", "2", "--partition", "dirichlet:0.5", "--image-size", "8",
                     "--rounds", "1", "--server-epochs", "1", "--state-dir",
                     str(tmp_path / "state"), "--no-progress", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    rep = run["class_report"]
    assert rep["classes"] == list(DIGITS)
    cm = np.array(rep["confusion"])
    assert cm.shape == (10, 10)
    assert cm.sum(axis=1).tolist() == [4 * 2] * 10  # every test image, once per device
    assert rep["per_class_accuracy"] == [round(cm[i, i] / 8, 4) for i in range(10)]
    assert run["rounds"][0]["per_class_accuracy"] == rep["per_class_accuracy"]
    assert abs(run["rounds"][0]["test_accuracy"] - np.trace(cm) / cm.sum()) < 1e-9
    split = json.loads((tmp_path / "state" / "device-data" / "split.json").read_text())
    assert sum(d["files"] for d in split["devices"]) == 120


def test_baselines_train_on_the_same_device_folders(tmp_path, capsys):
    folders = [tmp_path / "a", tmp_path / "b"]
    write_digits(folders[0], 5, classes=range(0, 6))
    write_digits(folders[1], 5, classes=range(4, 10), start=5)
    (folders[1] / "5" / "bad.jpg").write_bytes(b"not a jpeg")
    write_digits(tmp_path / "test", 2, start=20)
    argv = ["simulate", "--algorithm", "centralized", "--device-data", str(folders[0]),
            "--device-data", str(folders[1]), "--image-size", "8", "--rounds", "1",
            "--no-progress"]
    assert hub_main(argv) == 2  # own folders need held-out data to measure anything
    assert "--test-data" in capsys.readouterr().err
    out = tmp_path / "c.json"
    assert hub_main([*argv, "--test-data", str(tmp_path / "test"), "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["algorithm"] == "centralized" and run["devices"] == 2
    assert "[30, 30 samples]" in capsys.readouterr().out  # the bad file skipped, as a device


def test_status_page_shows_per_class_accuracy_and_the_confusion_matrix():
    from server_hub.monitoring.class_table import class_tables

    html = class_tables(class_report(np.array([[3, 1], [0, 4]]), ["cat", "<dog>"]))
    assert "<td>cat</td><td>0.750</td><td>4</td>" in html
    assert "&lt;dog&gt;" in html and "<dog>" not in html  # names are escaped
    assert "<td style=font-weight:bold>4</td>" in html
    assert class_tables(None) == ""


@pytest.mark.mqtt
def test_an_own_data_run_over_mqtt_delivers_models_that_score_the_hubs_accuracy(tmp_path):
    """Devices on their own folders over a real broker: at the end each holds its composed
    model, verified on the hub's --test-data, and `gkt-edge predict` with it on that folder
    gives the hub's last evaluation (the mean over devices), to the sample."""
    from edge_runtime.device.cli import main as edge_main

    write_digits(tmp_path / "train", 15)
    write_digits(tmp_path / "test", 6, start=15)
    out, state = tmp_path / "run.json", tmp_path / "state"
    assert hub_main(["simulate", "--split-data", str(tmp_path / "train"), "--test-data",
                     str(tmp_path / "test"), "--devices", "2", "--image-size", "8",
                     "--rounds", "1", "--server-epochs", "1", "--state-dir", str(state),
                     "--no-progress", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["delivery"]["acked"] == ["dev0", "dev1"]
    correct = 0
    for d in ("dev0", "dev1"):
        preds = tmp_path / f"{d}.json"
        assert edge_main(["predict", "--state-dir", str(state / "devices" / d),
                          str(tmp_path / "test"), "--json", str(preds)]) == 0
        got = json.loads(preds.read_text())
        assert len(got) == 60
        correct += sum(p["class"] == p["label"] for p in got)
    assert correct == round(run["final"]["test_accuracy"] * 120)
