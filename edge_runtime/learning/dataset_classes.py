"""Class names of the academic datasets, in label order: what a run spec announces for a
benchmark run (`gkt-hub serve --dataset ...`), so every run names its classes."""

from __future__ import annotations

from edge_runtime.learning.data import NUM_CLASSES

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DATASET_CLASSES = {  # datasets whose class names are fixed
    "digits": tuple(str(i) for i in range(10)),
    "cifar10": CIFAR10_CLASSES,
    "cinic10": CIFAR10_CLASSES,  # CINIC-10 keeps CIFAR-10's classes
}


def dataset_classes(dataset: str) -> tuple[str, ...]:
    """Names where the dataset fixes them; label indices as strings otherwise (CIFAR-100,
    whose names live in its download, which a device may not have)."""
    return DATASET_CLASSES.get(dataset) or tuple(str(i) for i in range(NUM_CLASSES[dataset]))
