"""A device's own images: listing, labels by the run's class names, content ids (stable
across restart, rename, additions and removals; collisions), the decode cache, bad files,
rescans feeding the device, and the per-device folder split."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from own_data_files import write_bad, write_digits, write_odd_but_good

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.device.own_data_source import OwnDataSource
from edge_runtime.learning.catalog import ImageCatalog, content_digest, id_from_digest
from edge_runtime.learning.image_folders import split_folder
from edge_runtime.learning.own_data import (
    DataSpec,
    OwnData,
    OwnDataConfig,
    OwnDataError,
)
from edge_runtime.learning.preprocess import Preprocess, load_image, to_rgb_u8
from edge_runtime.learning.train import EdgeTrainConfig

SPEC = DataSpec(tuple(str(d) for d in range(10)), Preprocess(size=8))


def own(path, state, val=0.0, skip_unknown=False, id_of=id_from_digest, spec=SPEC):
    cfg = OwnDataConfig(str(path), spec, val, skip_unknown)
    return OwnData(cfg, ImageCatalog(state / "own-data.sqlite", id_of=id_of))


def ids_by_file(result, data: OwnData, files) -> dict[str, int]:
    """File name -> its sample id (through the content, as the device sees it)."""
    ids = data.catalog.sample_ids(content_digest(f.read_bytes()) for f in files)
    out = {f.name: ids[content_digest(f.read_bytes())] for f in files}
    assert set(out.values()) <= set(result.train.ids.tolist()) | set(result.val.ids.tolist())
    return out


def test_labels_are_the_runs_class_names_not_the_folder_order(tmp_path):
    write_digits(tmp_path / "d", 3, classes=[3, 7])  # a device holding two of ten classes
    (tmp_path / "d" / "9").mkdir()  # an empty class folder is fine
    r = own(tmp_path / "d", tmp_path / "s").scan()
    assert sorted(set(r.train.labels.tolist())) == [3, 7]
    assert len(r.train.ids) == 6 and r.skipped_files == 0
    spec = DataSpec(("7", "3", "0", "1", "2", "4", "5", "6", "8", "9"), Preprocess(size=8))
    r2 = own(tmp_path / "d", tmp_path / "s2", spec=spec).scan()
    assert sorted(set(r2.train.labels.tolist())) == [0, 1]  # "7" is label 0 in that run


def test_pixels_are_the_preprocessed_images(tmp_path):
    files = write_digits(tmp_path / "d", 2, classes=[1])
    r = own(tmp_path / "d", tmp_path / "s").scan()
    expect = {content_digest(f.read_bytes()): to_rgb_u8(load_image(f), SPEC.preprocess)
              for f in files}
    ids = own(tmp_path / "d", tmp_path / "s").catalog.sample_ids(expect)
    for digest, px in expect.items():
        row = int(np.flatnonzero(r.train.ids == ids[digest])[0])
        assert np.array_equal(r.train.images[row], px)


def test_threaded_decoding_gives_the_files_in_order_and_each_broken_copy_skipped(
        tmp_path, monkeypatch):
    """New images decode on threads, a small window at a time; the result is what one
    thread gives: same order, pixels, duplicates, and every copy of a broken file skipped
    (not counted as a duplicate of a file that turned out unusable)."""
    from edge_runtime.learning import own_data as od

    files = write_digits(tmp_path / "d", 5)  # 50 images
    for f in files[:3]:  # 3 duplicates of good images, spread over the windows
        shutil.copy(f, tmp_path / "d" / f.parent.name / f"copy-{f.name}")
    broken = (tmp_path / "d" / "1" / "a-broken.png")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    shutil.copy(broken, tmp_path / "d" / "1" / "b-broken.png")  # decoded in the same window
    shutil.copy(broken, tmp_path / "d" / "9" / "z-broken.png")  # after it failed
    results = {}
    for threads, window in ((1, 1), (3, 4)):
        monkeypatch.setattr(od, "DECODE_THREADS", threads)
        monkeypatch.setattr(od, "DECODE_WINDOW", window)
        r = own(tmp_path / "d", tmp_path / f"s{threads}").scan()
        results[threads] = r
        assert (len(r.train.ids), r.duplicates, r.skipped_files, r.decoded) == (50, 3, 3, 50)
    one, many = results[1], results[3]
    assert np.array_equal(one.train.ids, many.train.ids)
    assert np.array_equal(one.train.images, many.train.images)
    assert np.array_equal(one.train.labels, many.train.labels)


def test_ids_survive_restart_rename_addition_and_removal(tmp_path):
    files = write_digits(tmp_path / "d", 4)
    state = tmp_path / "s"
    data = own(tmp_path / "d", state)
    first = data.scan()
    before = ids_by_file(first, data, files)
    assert len(set(before.values())) == 40
    assert all(0 <= v < 2**63 for v in before.values())

    data = own(tmp_path / "d", state)  # a restarted device: a new process, the same state
    again = data.scan()
    assert np.array_equal(again.train.ids, first.train.ids) and again.decoded == 0

    renamed = files[0].with_name("renamed.png")
    files[0].rename(renamed)
    moved_dir = tmp_path / "d" / "0" / "holiday"
    moved_dir.mkdir()
    files[1].rename(moved_dir / files[1].name)
    r = data.scan()
    assert np.array_equal(r.train.ids, first.train.ids) and r.decoded == 0

    added = write_digits(tmp_path / "d", 1, classes=[4], start=10)
    r = data.scan()
    new_id = ids_by_file(r, data, added)[added[0].name]
    assert new_id not in before.values() and r.decoded == 1
    assert set(r.train.ids.tolist()) == set(before.values()) | {new_id}

    files[5].unlink()
    r = data.scan()
    assert before[files[5].name] not in r.train.ids
    assert len(r.train.ids) == 40
    # a fresh state dir finds the same ids from content alone (no collisions here)
    fresh = own(tmp_path / "d", tmp_path / "other").scan()
    assert np.array_equal(fresh.train.ids, r.train.ids)


def test_identical_files_count_once(tmp_path, caplog):
    files = write_digits(tmp_path / "d", 2, classes=[2, 6])
    shutil.copy(files[0], tmp_path / "d" / "2" / "copy.png")
    shutil.copy(files[0], tmp_path / "d" / "6" / "mislabelled_copy.png")
    with caplog.at_level(logging.WARNING, "gkt.edge.data"):
        r = own(tmp_path / "d", tmp_path / "s").scan()
    assert len(r.train.ids) == 4 and r.duplicates == 2 and r.skipped_files == 0
    assert "mislabelled_copy.png" in caplog.text and "kept once" in caplog.text


def test_colliding_ids_probe_to_the_next_free_one_and_stay_put(tmp_path):
    files = write_digits(tmp_path / "d", 2, classes=[0, 1])
    state = tmp_path / "s"
    data = own(tmp_path / "d", state, id_of=lambda digest: 7)  # every image collides
    r = data.scan()
    assert sorted(r.train.ids.tolist()) == [7, 8, 9, 10]
    by_file = ids_by_file(r, data, files)
    files[0].unlink()  # the holder of one id leaves; nobody else takes its id
    extra = write_digits(tmp_path / "d", 1, classes=[5])
    data = own(tmp_path / "d", state, id_of=lambda digest: 7)  # and the device restarts
    r = data.scan()
    kept = {n: i for n, i in ids_by_file(r, data, files[1:]).items()}
    assert kept == {f.name: by_file[f.name] for f in files[1:]}
    assert ids_by_file(r, data, extra)[extra[0].name] == 11
    top = own(tmp_path / "d", tmp_path / "s2", id_of=lambda digest: 2**63 - 1).scan()
    assert sorted(top.train.ids.tolist()) == [0, 1, 2, 2**63 - 1]  # wraps below 2**63


def test_bad_files_are_skipped_and_reported_once(tmp_path, caplog):
    good = write_digits(tmp_path / "d", 2) + write_odd_but_good(tmp_path / "d")
    bad = write_bad(tmp_path / "d")
    (tmp_path / "d" / "README.txt").write_text("a file outside the class folders")
    (tmp_path / "d" / "1" / ".DS_Store").write_bytes(b"\0\1")  # hidden: not data
    data = own(tmp_path / "d", tmp_path / "s")
    with caplog.at_level(logging.WARNING, "gkt.edge.data"):
        r = data.scan()
        r2 = data.scan()
    assert len(r.train.ids) == len(good) and r.skipped_files == len(bad) + 1
    assert r2.skipped_files == r.skipped_files and r2.decoded == 0
    for f in [*bad, tmp_path / "d" / "README.txt"]:
        assert caplog.text.count(f"skipped {f}") == 1, f.name  # named once, not per round
    assert ".DS_Store" not in caplog.text
    why = dict(r.skipped)
    assert why[str(bad[0])] == "empty file"
    assert "not an image" in why[str(tmp_path / "d" / "5" / "text.jpg")]
    assert "cannot decode" in why[str(tmp_path / "d" / "5" / "truncated.jpg")]
    shutil.copy(good[0], bad[1])  # a bad file replaced by a good one is used next scan
    assert len(data.scan().train.ids) == len(good)  # (a copy of good[0]: counted once)
    write_digits(tmp_path / "d", 1, classes=[8], start=30)
    assert len(data.scan().train.ids) == len(good) + 1


def test_refusals_say_what_to_do(tmp_path):
    write_bad(tmp_path / "bad")
    with pytest.raises(OwnDataError, match="no usable image.*one subfolder per class"):
        own(tmp_path / "bad", tmp_path / "s").scan()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OwnDataError, match="no usable image"):
        own(tmp_path / "empty", tmp_path / "s").scan()
    with pytest.raises(OwnDataError, match="no such file"):
        own(tmp_path / "missing", tmp_path / "s").scan()
    write_digits(tmp_path / "d", 1, classes=[1])
    write_digits(tmp_path / "d" / "cats", 1, classes=[2])  # d/cats/2/...: label "cats"
    with pytest.raises(OwnDataError, match=r"labels the run does not know: \['cats'\]"):
        own(tmp_path / "d", tmp_path / "s").scan()
    r = own(tmp_path / "d", tmp_path / "s", skip_unknown=True).scan()
    assert len(r.train.ids) == 1 and r.skipped_files == 1


def test_a_folder_of_device_folders_is_pointed_one_level_down(tmp_path):
    """--data at what `gkt-hub split-data` wrote (split/device-K/class/...)."""
    for k in range(2):
        write_digits(tmp_path / "split" / f"device-{k}", 1, classes=[1, 2])
    with pytest.raises(OwnDataError) as err:
        own(tmp_path / "split", tmp_path / "s").scan()
    assert "['device-0', 'device-1']" in str(err.value)
    assert f"did you mean --data {tmp_path / 'split' / 'device-0'}?" in str(err.value)


def test_manifests_csv_and_jsonl(tmp_path):
    files = write_digits(tmp_path / "imgs", 1, classes=[1, 2, 3])
    rows = [f"imgs/{f.parent.name}/{f.name},{f.parent.name}" for f in files]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows)
                                    + "\nonly-one-column\nimgs/missing.png,4\n")
    r = own(tmp_path / "m.csv", tmp_path / "s").scan()
    assert sorted(r.train.labels.tolist()) == [1, 2, 3] and r.skipped_files == 2
    lines = [json.dumps({"path": str(f), "label": f.parent.name}) for f in files]
    (tmp_path / "m.jsonl").write_text("\n".join([*lines, "{not json", ""]))
    r2 = own(tmp_path / "m.jsonl", tmp_path / "s").scan()
    assert np.array_equal(r2.train.ids, r.train.ids) and r2.skipped_files == 1
    (tmp_path / "u.csv").write_text(f"{rows[0]}\nimgs/1/x.png,dog\n")
    with pytest.raises(OwnDataError, match="dog"):
        own(tmp_path / "u.csv", tmp_path / "s").scan()


def test_held_out_images_are_chosen_by_content(tmp_path):
    write_digits(tmp_path / "d", 20)
    r = own(tmp_path / "d", tmp_path / "s", val=0.2).scan()
    assert 20 <= len(r.val.ids) <= 60 and len(r.train.ids) + len(r.val.ids) == 200
    assert not set(r.val.ids.tolist()) & set(r.train.ids.tolist())
    write_digits(tmp_path / "d", 5, start=20)
    r2 = own(tmp_path / "d", tmp_path / "s", val=0.2).scan()
    assert set(r.val.ids.tolist()) <= set(r2.val.ids.tolist())  # no image changes side


def test_a_folder_that_looks_empty_for_a_while_is_not_decoded_again(tmp_path):
    """A USB stick or network share unmounted mid-run leaves an empty mount point: the
    rescan fails (the device trains on its last images) and the cache keeps the pixels,
    so when the images come back nothing is decoded again and the ids are the same."""
    write_digits(tmp_path / "d", 3)
    data = own(tmp_path / "d", tmp_path / "s")
    first = data.scan()
    assert first.decoded == 30
    os.rename(tmp_path / "d", tmp_path / "away")
    (tmp_path / "d").mkdir()  # the empty mount point
    with pytest.raises(OwnDataError, match="no usable image"):
        data.scan()
    os.rmdir(tmp_path / "d")
    os.rename(tmp_path / "away", tmp_path / "d")
    back = own(tmp_path / "d", tmp_path / "s").scan()  # a restarted device, too
    assert back.decoded == 0 and np.array_equal(back.train.ids, first.train.ids)


def test_rescans_feed_the_device_and_drop_removed_logits(tmp_path):
    files = write_digits(tmp_path / "d", 3)
    source = OwnDataSource(own(tmp_path / "d", tmp_path / "s"))
    train, train_eval, ids, positions = source.device_args()
    dev = EdgeDevice("a", train, train_eval, ids, 10, EdgeTrainConfig(batch_size=8),
                     positions=positions, ids_may_change=True)
    dev.receive_logits(dev.sample_ids, torch.ones(30, 10))
    assert dev.train().samples == 30 and dev.train().distilled == 30
    removed = ids_by_file(source.result, source.data, files[:1])[files[0].name]
    files[0].unlink()
    write_digits(tmp_path / "d", 2, classes=[9], start=10)
    source.refresh(dev)
    assert dev.num_samples == 31 and removed not in dev.sample_ids
    stats = dev.train()
    assert stats.samples == 31 and stats.distilled == 29  # the 2 new ones have no logits yet
    batch = next(iter(dev._extract))
    x, y, sid = batch
    row = {int(i): k for k, i in enumerate(source.result.train.ids)}[int(sid[0])]
    assert int(y[0]) == int(source.result.train.labels[row])  # ids and pixels stay paired
    dev.save(tmp_path / "state")
    write_digits(tmp_path / "d", 1, classes=[0], start=10)  # added while the device was off
    source = OwnDataSource(own(tmp_path / "d", tmp_path / "s"))
    train, train_eval, ids, positions = source.device_args()
    again = EdgeDevice("a", train, train_eval, ids, 10, EdgeTrainConfig(batch_size=8),
                       positions=positions, ids_may_change=True)
    assert again.load(tmp_path / "state") and len(again.bank) == 29 and again.num_samples == 32


def test_split_folder_links_every_file_once(tmp_path):
    write_digits(tmp_path / "src", 12)
    (tmp_path / "src" / "7" / "nested").mkdir()
    write_digits(tmp_path / "src" / "7" / "nested", 2, classes=[1])  # src/7/nested/1/*.png
    folders = split_folder(tmp_path / "src", tmp_path / "split", 3, "dirichlet:0.5", seed=4)
    linked = sorted(os.path.realpath(p) for f in folders for p in f.rglob("*.png"))
    sources = sorted(os.path.realpath(p) for p in (tmp_path / "src").rglob("*.png"))
    assert linked == sources  # every file exactly once over the devices
    assert all((f / str(c)).is_dir() for f in folders for c in range(10))
    report = json.loads((tmp_path / "split" / "split.json").read_text())
    assert sum(d["files"] for d in report["devices"]) == 122 and report["seed"] == 4
    again = split_folder(tmp_path / "src", tmp_path / "split2", 3, "dirichlet:0.5", seed=4)
    assert [sorted(p.name for p in f.rglob("*.png")) for f in again] == \
        [sorted(p.name for p in f.rglob("*.png")) for f in folders]  # seeded
    with pytest.raises(FileExistsError):
        split_folder(tmp_path / "src", tmp_path / "split", 3)
    r = own(folders[0], tmp_path / "s").scan()  # a split folder is a device's own data
    assert len(r.train.ids) == sum(1 for _ in folders[0].rglob("*.png"))
