"""What a deployed graph says about itself: ONNX ``metadata_props`` (string key -> value).

Structured values are JSON strings. onnxruntime shows them as
``session.get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import json

import onnx

from edge_runtime import __version__
from export.graphs import GraphSpec

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CLASS_NAMES = {
    "digits": tuple(str(i) for i in range(10)),
    "cifar10": CIFAR10_CLASSES,
    "cinic10": CIFAR10_CLASSES,  # CINIC-10 keeps CIFAR-10's classes
}


def class_names(dataset: str, num_classes: int) -> list[str]:
    """Names where the dataset fixes them; class indices as strings otherwise (CIFAR-100)."""
    names = CLASS_NAMES.get(dataset)
    if names is not None and len(names) == num_classes:
        return list(names)
    return [str(i) for i in range(num_classes)]


def graph_metadata(spec: GraphSpec, meta: dict, opset: int, exporter: str,
                   run_id: str | None = None) -> dict[str, str]:
    """Metadata for one graph from the checkpoint's ``meta.json`` and how it was exported."""
    ncls = int(meta["num_classes"])
    norm = meta["normalization"]
    run = run_id or meta.get("run_id") or ""
    props = {
        "graph": spec.kind,
        "run_id": run,
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
