"""A device's own images: a folder with one subfolder per class, or a ``path,label``
manifest (CSV or JSON lines), turned into uint8 arrays with content-derived sample ids.

Labels are the run's class names, in the run's order (``DataSpec.classes``): a device never
derives a label map from its own folders, so two devices with different subsets of the
classes agree on what label 3 means. A device may hold any subset; empty class folders
are fine. Bad files never stop a device: each is skipped, counted and named once in the
log. Refused (``OwnDataError``, exit 2 at the CLI): no usable image at all, or labels the
run does not know (unless ``skip_unknown_labels``).

``OwnData.scan()`` is called before every round: files added since join, files removed
leave (with their logits), unchanged files are only stat'ed (``catalog.ImageCatalog``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.learning.catalog import ImageCatalog, content_digest
from edge_runtime.learning.preprocess import Preprocess, UnreadableImage, decode_image, to_rgb_u8

log = logging.getLogger("gkt.edge.data")
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
COMMIT_EVERY = 500  # decoded images between catalog commits: a killed first pass keeps most
DECODE_THREADS = min(4, os.cpu_count() or 1)
DECODE_WINDOW = 4 * DECODE_THREADS  # files read but not yet decoded, at most


class OwnDataError(ValueError):
    """Data a device cannot train on at all; the message says what to do."""


@dataclass(frozen=True)
class DataSpec:
    """What the run fixes about data, the same on every device: the class names (their
    order is the label map) and the preprocessing. Today built from gkt-edge flags
    (``--classes``, ``--image-size``, ``--normalize``, ``--resize``); a hub-announced run
    spec carries the same fields (``to_dict``/``from_dict``)."""

    classes: tuple[str, ...]
    preprocess: Preprocess = Preprocess()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.classes:
            raise ValueError("the run needs at least one class name")
        dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dup or any(not c.strip() for c in self.classes):
            raise ValueError(f"class names must be unique and non-empty, got {self.classes}")

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        return cls(tuple(data["classes"]), Preprocess.from_dict(data["preprocess"]))


@dataclass(frozen=True)
class OwnDataConfig:
    """Device-local: where the images are and what to do with them."""

    path: str
    spec: DataSpec
    val_fraction: float = 0.1  # held out for the device's own accuracy (0: none)
    skip_unknown_labels: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class Entry:
    """A listed file and its class name (``where`` names it in messages)."""

    path: str
    label: str
    where: str


@dataclass
class Listing:
    entries: list[Entry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why)


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .DS_Store, ._AppleDouble, .thumbnails: not data


def list_folder(root: Path) -> Listing:
    """One subfolder per class (nested folders inside a class are walked)."""
    out = Listing()
    for item in sorted(root.iterdir()):
        if _hidden(item.name):
            continue
        if not item.is_dir():
            out.skipped.append((str(item), "not inside a class folder"))
            continue
        for dirpath, dirnames, files in os.walk(item, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for name in sorted(files):
                if not _hidden(name):
                    path = os.path.join(dirpath, name)
                    out.entries.append(Entry(path, item.name, path))
    return out


def list_manifest(path: Path) -> Listing:
    """``path,label`` rows (CSV, header optional) or JSON lines ``{"path":..,"label":..}``;
    relative paths are resolved against the manifest's folder."""
    out = Listing()
    base = path.parent
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = list(csv.reader(f)) if kind == "csv" else f.read().splitlines()
    for n, row in enumerate(lines, 1):
        where = f"{path}:{n}"
        if kind == "csv":
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2:
                out.skipped.append((where, f"expected 2 columns path,label, got {len(row)}"))
                continue
            file, label = row
        else:
            if not row.strip():
                continue
            try:
                obj = json.loads(row)
                file, label = obj["path"], obj["label"]
            except (ValueError, TypeError, KeyError):
                out.skipped.append((where, 'expected {"path": ..., "label": ...}'))
                continue
        file, label = str(file).strip(), str(label).strip()
        out.entries.append(Entry(str(base / file), label, f"{file} ({where})"))
    return out


def list_data(path: Path) -> Listing:
    if path.is_dir():
        return list_folder(path)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return list_manifest(path)
    if path.exists():
        raise OwnDataError(f"--data {path}: expected a folder with one subfolder per class, "
                           f"or a manifest ending in {sorted(MANIFEST_SUFFIXES)}")
    raise OwnDataError(f"--data {path}: no such file or folder")


@dataclass(frozen=True)
class LocalImages:
    """Images of one device as training arrays, sorted by sample id."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,)
    ids: np.ndarray  # int64 (N,), increasing


@dataclass(frozen=True)
class ScanResult:
    train: LocalImages
    val: LocalImages  # held out by content, so an image never changes side
    skipped: tuple[tuple[str, str], ...]  # (file or manifest line, why)
    duplicates: int  # files whose bytes another listed file already has
    decoded: int  # images decoded by this scan (the others came from memory or the cache)

    @property
    def skipped_files(self) -> int:
        return len(self.skipped)


def is_held_out(digest: bytes, fraction: float) -> bool:
    """Bits of the digest the id does not use decide it: stable, independent of the id."""
    return int.from_bytes(digest[8:16], "big") < fraction * 2.0**64


class OwnData:
    """A device's own images, rescanned before each round."""

    def __init__(self, cfg: OwnDataConfig, catalog: ImageCatalog) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.label_of = {c: i for i, c in enumerate(cfg.spec.classes)}
        self._named: set[tuple[str, str]] = set()  # bad files already in the log
        self._digests: list[bytes] = []  # rows of _pixels
        self._last_counts: tuple[int, ...] | None = None  # the last scan's, as logged
        self._pixels = np.zeros((0, *self.shape), np.uint8)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.cfg.spec.preprocess.size
        return (s, s, 3)

    def scan(self) -> ScanResult:
        listing = list_data(Path(self.cfg.path).expanduser())
        entries, skipped = self._known_labels(listing)
        key = self.cfg.spec.preprocess.cache_key
        previous = dict(zip(self._digests, self._pixels))  # views, not copies
        found: dict[bytes, int] = {}  # digest -> label (of its first name)
        pixels: dict[bytes, np.ndarray] = {}
        bad: dict[bytes, str] = {}  # digests that did not decode in this scan
        # new images decode on worker threads (PIL releases the GIL), a window at a time so
        # that only a few files' bytes are held; the catalog stays on this thread
        pending: list[tuple[Entry, bytes, bytes | None]] = []
        twins: dict[bytes, list[Entry]] = {}  # more names of a pending digest
        duplicates = decoded = 0
        pool: ThreadPoolExecutor | None = None

        def flush() -> None:
            nonlocal pool, duplicates, decoded
            pool = pool or ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
            for (e, digest, _), px in zip(pending, pool.map(self._try_decode, pending)):
                names = twins.pop(digest, [])
                if isinstance(px, UnreadableImage):
                    bad[digest] = str(px).removeprefix(f"{e.path}: ")
                    del found[digest]
                    duplicates -= len(names)  # broken copies: skipped, each
                    for f in (e, *names):
                        self.catalog.remember_file(f.path, os.stat(f.path), None, bad[digest])
                        skipped.append((f.where, bad[digest]))
                    continue
                self.catalog.put_pixels(key, digest, px)
                pixels[digest] = px
                decoded += 1
                if decoded % COMMIT_EVERY == 0:
                    self.catalog.commit()
                    log.info("decoded %d new images so far", decoded)
            pending.clear()

        try:
            for e in entries:
                digest, data, why = self._fingerprint(e)
                if digest is not None and digest in bad:
                    digest, why = None, bad[digest]
                    self.catalog.remember_file(e.path, os.stat(e.path), digest, why)
                if digest is None:
                    skipped.append((e.where, why))
                    continue
                label = self.label_of[e.label]
                if digest in found:
                    duplicates += 1
                    if digest in twins:
                        twins[digest].append(e)
                    if found[digest] != label:
                        first = self.cfg.spec.classes[found[digest]]
                        self._name(e.where, f"the same image as a file labelled {first!r}; "
                                            "kept once, with that label")
                    continue
                found[digest] = label
                px = previous.get(digest)
                if px is None:
                    px = self.catalog.pixel(key, digest, self.shape)
                if px is None:
                    pending.append((e, digest, data))
                    twins[digest] = []
                    if len(pending) >= DECODE_WINDOW:
                        flush()
                    continue
                pixels[digest] = px
            if pending:
                flush()
        finally:
            if pool is not None:
                pool.shutdown()
        for what, why in skipped:
            self._name(what, why)
        if not pixels:  # before forgetting: an unmounted USB stick or share looks empty,
            self.catalog.commit()  # and its images must not be decoded all over again
            raise OwnDataError(self._nothing_usable(len(entries), skipped))
        self.catalog.forget_files_except(e.path for e in entries)
        self.catalog.forget_pixels_except(key, pixels)
        self.catalog.commit()
        counts = (len(pixels), duplicates, len(skipped))
        # every round rescans: say so only when the folder changed (or on the first scan)
        log.log(logging.INFO if decoded or counts != self._last_counts else logging.DEBUG,
                "%s: %d images (%d newly decoded, %d duplicate files, %d skipped)",
                self.cfg.path, len(pixels), decoded, duplicates, len(skipped))
        self._last_counts = counts
        return self._arrays(found, pixels, tuple(skipped), duplicates, decoded)

    def _known_labels(self, listing: Listing) -> tuple[list[Entry], list[tuple[str, str]]]:
        skipped = list(listing.skipped)
        unknown = sorted({e.label for e in listing.entries} - self.label_of.keys())
        if unknown and not self.cfg.skip_unknown_labels:
            raise OwnDataError(
                f"--data {self.cfg.path}: labels the run does not know: {unknown[:10]} "
                f"(the run's classes: {list(self.cfg.spec.classes)}). Rename or remove those "
                "folders/rows, or pass --skip-unknown-labels to leave them out"
                + self._one_level_too_high(unknown))
        entries = [e for e in listing.entries if e.label in self.label_of]
        skipped += [(e.where, f"label {e.label!r} is not one of the run's classes")
                    for e in listing.entries if e.label not in self.label_of]
        return entries, skipped

    def _one_level_too_high(self, unknown: list[str]) -> str:
        """A hint when the unknown "classes" hold class folders themselves: --data points
        at a folder of devices' folders (what `gkt-hub split-data` writes)."""
        root = Path(self.cfg.path)
        if not root.is_dir() or not all(
                any((root / u / c).is_dir() for c in self.cfg.spec.classes) for u in unknown):
            return ""
        return (f". Each of them holds class folders: did you mean --data "
                f"{root / unknown[0]}?")

    def _fingerprint(self, e: Entry) -> tuple[bytes | None, bytes | None, str]:
        """(digest, the bytes if they had to be read, why not) of a listed file."""
        try:
            st = os.stat(e.path)
        except OSError as err:
            return None, None, f"cannot read ({err.strerror or err})"
        digest, bad = self.catalog.known_file(e.path, st)
        if bad is not None:
            return None, None, bad
        if digest is not None:
            return digest, None, ""
        if st.st_size == 0:
            self.catalog.remember_file(e.path, st, None, "empty file")
            return None, None, "empty file"
        try:
            with open(e.path, "rb") as f:
                data = f.read()
        except OSError as err:
            return None, None, f"cannot read ({err.strerror or err})"
        digest = content_digest(data)
        self.catalog.remember_file(e.path, st, digest)
        return digest, data, ""

    def _try_decode(self, job: tuple[Entry, bytes, bytes | None]
                    ) -> np.ndarray | UnreadableImage:
        try:
            return self._decode(job[0], job[2])
        except UnreadableImage as err:
            return err

    def _decode(self, e: Entry, data: bytes | None) -> np.ndarray:
        if data is None:  # known file whose pixels are not cached (another input size)
            try:
                data = Path(e.path).read_bytes()
            except OSError as err:
                raise UnreadableImage(f"{e.path}: cannot read ({err.strerror})") from err
        pre = self.cfg.spec.preprocess
        return to_rgb_u8(decode_image(data, e.path, pre.size), pre)

    def _arrays(self, found: dict[bytes, int], pixels: dict[bytes, np.ndarray],
                skipped: tuple[tuple[str, str], ...], duplicates: int,
                decoded: int) -> ScanResult:
        ids = self.catalog.sample_ids(found)
        self.catalog.commit()
        order = sorted(found, key=ids.__getitem__)
        if order != self._digests:  # else keep the array: no second copy of every image
            self._digests = order
            self._pixels = np.stack([pixels[d] for d in order])
        labels = np.array([found[d] for d in order], np.int64)
        sids = np.array([ids[d] for d in order], np.int64)
        held = np.array([is_held_out(d, self.cfg.val_fraction) for d in order], bool)
        if held.all():  # too few images to hold any out and still train
            held[:] = False
        return ScanResult(
            LocalImages(self._pixels[~held], labels[~held], sids[~held]),
            LocalImages(self._pixels[held], labels[held], sids[held]),
            skipped, duplicates, decoded)

    def _name(self, what: str, why: str) -> None:
        if (what, why) not in self._named:
            self._named.add((what, why))
            log.warning("skipped %s: %s", what, why)

    def _nothing_usable(self, listed: int, skipped: list[tuple[str, str]]) -> str:
        classes = ", ".join(self.cfg.spec.classes[:10])
        head = f"--data {self.cfg.path}: no usable image ({listed} files listed"
        head += f", {len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" \
            if skipped else ")"
        return (f"{head}. Put images (JPEG, PNG, BMP, WebP, GIF) in one subfolder per class "
                f"named after the run's classes ({classes}), or give a path,label manifest")
