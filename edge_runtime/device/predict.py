"""`gkt-edge predict`: classify image files with a delivered (or any exported) ONNX model.

The model says how to prepare an image (its ``preprocess`` metadata, written by the
export from the run's preprocessing) and what its outputs mean (``classes``), so this
runs exactly the training preprocessing (edge_runtime.learning.preprocess) with nothing
else to configure. onnxruntime is imported only here, when predicting: the ``[predict]``
extra adds it, and training never needs it.

Inputs: image files, folders (searched recursively; a first-level subfolder named like
a class is that image's label) and manifests (``.csv``/``.txt``: ``path[,label]`` per
line, paths relative to the manifest). A file that cannot be read is reported and
skipped. Where labels are known the summary gives the accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from edge_runtime.device.model_store import current_model
from edge_runtime.learning.preprocess import (
    Preprocess,
    UnreadableImage,
    load_image,
    preprocess,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                            ".tiff", ".ppm", ".pgm", ".heic", ".heif"})
MANIFEST_SUFFIXES = frozenset({".csv", ".txt"})


class ModelError(ValueError):
    """No usable model: missing file, not ONNX, or metadata that does not say enough."""


@dataclass(frozen=True)
class PredictConfig:
    paths: tuple[str, ...]
    model: str | None = None  # an .onnx file
    state_dir: str | None = None  # or the newest model delivered into this state dir
    int8: bool = False  # with state_dir: the int8 model instead of fp32
    top_k: int = 3
    batch_size: int = 32
    json_out: str | None = None
    threads: int = 0  # onnxruntime intra-op threads; 0 = its default (one per core)
    quiet: bool = False  # no per-image lines, no progress bar

    def __post_init__(self) -> None:
        if (self.model is None) == (self.state_dir is None):
            raise ValueError("give --model FILE.onnx or --state-dir DIR (one of them)")
        if not self.paths:
            raise ValueError("no images given")
        if self.top_k < 1 or self.batch_size < 1 or self.threads < 0:
            raise ValueError("--top-k and --batch-size must be >= 1, --threads >= 0")


@dataclass(frozen=True)
class Model:
    """An onnxruntime session and what its metadata says."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    input_name: str
    classes: list[str]
    spec: Preprocess
    meta: dict[str, str]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: x})[0].astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def resolve_model(cfg: PredictConfig) -> Path:
    if cfg.model is not None:
        return Path(cfg.model)
    variant = "int8" if cfg.int8 else "fp32"
    found = current_model(Path(cfg.state_dir), variant)
    if found is None:
        raise ModelError(f"no {variant} model in {cfg.state_dir}/model/: the hub sends one "
                         "at the end of a run; ask for it with `gkt-edge fetch-model`")
    return found


def load_model(path: Path, threads: int = 0) -> Model:
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise ModelError("onnxruntime is missing: pip install 'gkt-edge-toolkit[predict]'"
                         ) from None
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types, none from a common base
        raise ModelError(f"{path}: onnxruntime cannot load it: {str(err)[:300]}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if "preprocess" not in meta or "classes" not in meta or len(
            session.get_outputs()[0].shape) != 2:  # an extractor's output is H, not logits
        raise ModelError(f"{path}: not an image classifier exported by this toolkit (graph "
                         f"{meta.get('graph', '?')!r}; no preprocess/classes metadata or no "
                         "logits output): predict takes composed or edge graphs")
    try:
        spec = Preprocess.from_dict(json.loads(meta["preprocess"]))
        classes = [str(c) for c in json.loads(meta["classes"])]
    except (ValueError, TypeError) as err:
        raise ModelError(f"{path}: unusable metadata: {err}") from None
    inp = session.get_inputs()[0]
    return Model(path, session, inp.name, classes, spec, meta)


@dataclass(frozen=True)
class Item:
    path: str
    label: str | None = None  # a class name, where the input says


def _manifest(path: Path, classes: list[str]) -> Iterator[Item]:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.lower().startswith("path,"):
            continue
        name, _, label = line.partition(",")
        p = Path(name.strip())
        yield Item(str(p if p.is_absolute() else path.parent / p),
                   _label(label.strip(), classes))


def _label(text: str, classes: list[str]) -> str | None:
    if text in classes:
        return text
    if text.isdigit() and int(text) < len(classes):  # a class index
        return classes[int(text)]
    return None


def collect(paths: tuple[str, ...], classes: list[str],
            report: Callable[[str], None]) -> tuple[list[Item], bool]:
    """(items in the given order, folders sorted; whether any folder or manifest was given:
    those show a progress bar, on a terminal)."""
    items: list[Item] = []
    many = False
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            many = True
            for f in sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES
                            and q.is_file()):
                parts = f.relative_to(p).parts
                items.append(Item(str(f), parts[0] if len(parts) > 1 and parts[0] in classes
                                  else None))
        elif p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file():
            many = True
            items.extend(_manifest(p, classes))
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            items.append(Item(str(p)))  # a missing image is reported when it is read
        else:
            report(f"skipped {p}: no such file or folder")
    return items, many


@dataclass
class Summary:
    predictions: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: why"
    seconds: float = 0.0
    labelled: int = 0
    correct: int = 0

    @property
    def images_per_s(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def _batches(items: list[Item], spec: Preprocess, size: int, skipped: list[str],
             report: Callable[[str], None]) -> Iterator[tuple[list[Item], np.ndarray]]:
    good: list[Item] = []
    arrays: list[np.ndarray] = []
    for item in items:
        try:
            arrays.append(preprocess(load_image(item.path, spec.size), spec))
            good.append(item)
        except UnreadableImage as err:
            skipped.append(str(err))
            report(f"skipped {err}")
        if len(good) == size:
            yield good, np.stack(arrays)
            good, arrays = [], []
    if good:
        yield good, np.stack(arrays)


def predict(model: Model, items: list[Item], cfg: PredictConfig, out: TextIO = sys.stdout,
            progress: bool = False) -> Summary:
    from tqdm import tqdm

    summary = Summary()
    k = min(cfg.top_k, len(model.classes))
    bar = tqdm(total=len(items), unit="img", desc="predict", disable=None if progress else True,
               file=sys.stderr)
    say = (lambda s: bar.write(s, file=out)) if progress else (lambda s: print(s, file=out))
    note = (lambda s: bar.write(s, file=sys.stderr)) if progress else (
        lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    for batch, x in _batches(items, model.spec, cfg.batch_size, summary.skipped, note):
        probs = model.probabilities(x)
        for item, p in zip(batch, probs):
            order = np.argsort(-p, kind="stable")[:k]
            top = [{"class": model.classes[i], "probability": round(float(p[i]), 6)}
                   for i in order]
            rec = {"path": item.path, "class": top[0]["class"],
                   "probability": top[0]["probability"], "top_k": top}
            if item.label is not None:
                rec["label"] = item.label
                summary.labelled += 1
                summary.correct += int(item.label == rec["class"])
            summary.predictions.append(rec)
            if not cfg.quiet:
                say(f"{item.path}: " + ", ".join(f"{t['class']} {t['probability']:.3f}"
                                                  for t in top))
        bar.update(len(batch))
    bar.update(len(items) - bar.n)  # the skipped ones
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def run_predict(cfg: PredictConfig, out: TextIO = sys.stdout) -> tuple[Model, Summary]:
    """Resolve and load the model, predict every input, write ``--json``. ModelError if
    there is no usable model; unreadable images are skipped, never fatal."""
    model = load_model(resolve_model(cfg), cfg.threads)
    items, many = collect(cfg.paths, model.classes, lambda s: print(s, file=sys.stderr))
    show = many and not cfg.quiet and len(items) > 1 and sys.stderr.isatty()
    summary = predict(model, items, cfg, out, progress=show)
    if cfg.json_out:
        path = Path(cfg.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary.predictions, indent=1))
    return model, summary


def describe(model: Model, summary: Summary) -> str:
    """The closing line: what ran, how fast, how well where labels were known."""
    meta = model.meta
    what = f"{meta.get('graph', '?')} model, round {meta.get('round', '?')}"
    if meta.get("test_accuracy"):
        what += f", hub test accuracy {float(meta['test_accuracy']):.4f}"
    line = (f"{len(summary.predictions)} images in {summary.seconds:.2f} s "
            f"({summary.images_per_s:.1f} images/s) with {model.path.name} ({what})")
    if summary.skipped:
        line += f"; {len(summary.skipped)} skipped"
    if summary.accuracy is not None:
        line += f"; accuracy {summary.accuracy:.4f} on {summary.labelled} labelled images"
    return line
