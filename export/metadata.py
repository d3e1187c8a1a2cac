"""What a deployed graph says about itself: ONNX ``metadata_props`` (string key -> value).

Structured values are JSON strings. onnxruntime shows them as
``session.get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import json

import onnx

from edge_runtime import __version__
from edge_runtime.learning.dataset_classes import DATASET_CLASSES
from edge_runtime.learning.preprocess import Preprocess
from export.graphs import IMAGE_INPUT, GraphSpec


def class_names(dataset: str, num_classes: int) -> list[str]:
    """Names where the dataset fixes them; class indices as strings otherwise (CIFAR-100)."""
    names = DATASET_CLASSES.get(dataset)
    if names is not None and len(names) == num_classes:
        return list(names)
    return [str(i) for i in range(num_classes)]


# what pixels mean, where a dataset fixes it and a user could not guess it from the spec
INPUT_NOTES = {
    "digits": "light strokes on a dark background (scikit-learn's digits): invert dark ink "
              "on paper before predicting",
}


# edge_runtime.learning.preprocess, steps 1-2, in words for a program written elsewhere
CHANNELS = ("RGB, 8 bits per channel, EXIF orientation applied; grey repeats its channel 3 "
            "times; 16-bit grey is scaled to 8 bits; transparent pixels go over white")


def preprocess_of(meta: dict) -> Preprocess:
    """The preprocessing the checkpoint's model was trained with: the run spec's, or for
    the bundled datasets their input size and normalization (square images: no crop)."""
    if meta.get("preprocess"):
        return Preprocess.from_dict(meta["preprocess"])
    norm = meta["normalization"]
    return Preprocess(int(meta["image_size"]), tuple(norm["mean"]), tuple(norm["std"]))


def graph_metadata(spec: GraphSpec, meta: dict, opset: int, exporter: str,
                   run_id: str | None = None) -> dict[str, str]:
    """Metadata for one graph from the checkpoint's ``meta.json`` and how it was exported."""
    ncls = int(meta["num_classes"])
    norm = meta["normalization"]
    run = run_id or meta.get("run_id") or ""
    props = {
        "graph": spec.kind,
        "run_id": run,
        "input_notes": INPUT_NOTES.get(meta["dataset"], ""),
        "toolkit_version": __version__,
        "dataset": meta["dataset"],
        "round": "" if spec.round is None else str(spec.round),
        "device": spec.device or "",
        "server_model": meta["server_model"] if spec.kind in ("server", "composed") else "",
        "num_classes": str(ncls),
        "classes": json.dumps(meta.get("classes") or class_names(meta["dataset"], ncls)),
        "input_name": spec.input_name,
        "input_shape": json.dumps(["batch", *spec.input_shape]),
        "input_size": str(int(meta["image_size"])),
        "output_name": spec.output_name,
        # images are scaled to [0, 1], then (x - mean) / std per channel, NCHW float32
        "normalization": json.dumps({"mean": list(norm["mean"]), "std": list(norm["std"]),
                                     "input_range": [0.0, 1.0]}),
        "opset": str(opset),
        "exporter": exporter,
    }
    if spec.kind in IMAGE_INPUT:  # everything that turns an image file into the input
        props["preprocess"] = json.dumps(preprocess_of(meta).to_dict())
        props["channels"] = CHANNELS
    return {k: v for k, v in props.items() if v != ""}


def accuracy_metadata(accuracy: float, samples: int) -> dict[str, str]:
    """What the verified graph scored on the hub's test split (its evaluation data)."""
    return {"test_accuracy": f"{accuracy:.6f}", "test_samples": str(samples)}


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace keys that already exist, keep any others."""
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update(props)
    del model.metadata_props[:]
    for key, value in existing.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
