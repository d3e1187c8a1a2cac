"""Feeds an ``EdgeDevice`` from its own images (``learning.own_data``), rescanned before
every round: files added since join the round, removed files leave it with their logits.

The images live in memory as uint8 (3 KB a 32x32 image) and are normalised and augmented
per batch by the same ``U8Images`` as the in-memory academic datasets, so a round on own
data costs what a round on CIFAR costs once the files are decoded.
"""

from __future__ import annotations

import logging

import numpy as np

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.learning.batches import U8Images
from edge_runtime.learning.data import Split, make_loader
from edge_runtime.learning.own_data import LocalImages, OwnData, OwnDataError, ScanResult

log = logging.getLogger("gkt.edge.data")
EVAL_BATCH = 256


def splits(images: LocalImages, normalization, augment: bool) -> tuple[Split, Split]:
    """(training view, possibly augmented; the same images unaugmented)."""
    def view(aug: bool) -> Split:
        return Split(U8Images(images.images, images.labels, normalization, aug),
                     images.labels, normalization)

    return view(augment), view(False)


class OwnDataSource:
    def __init__(self, data: OwnData, augment: bool = True) -> None:
        """Scans once now: raises ``OwnDataError`` if there is nothing to train on."""
        self.data = data
        self.augment = augment
        pre = data.cfg.spec.preprocess
        self.normalization = (pre.mean, pre.std)
        self.result: ScanResult = data.scan()

    @property
    def skipped_files(self) -> int:
        return self.result.skipped_files

    def device_args(self) -> tuple[Split, Split, np.ndarray, np.ndarray]:
        """EdgeDevice's (train split, eval split, sample ids, positions) for the last scan."""
        train = self.result.train
        return (*splits(train, self.normalization, self.augment), train.ids,
                np.arange(len(train.ids)))

    def val_loader(self):
        """The held-out images, or None when the device holds none out."""
        val = self.result.val
        if not len(val.ids):
            return None
        return make_loader(splits(val, self.normalization, False)[1].dataset, EVAL_BATCH,
                           shuffle=False)

    def refresh(self, device: EdgeDevice) -> None:
        """Rescan; hand the device its new samples if they changed. Data that became
        unusable mid-run (the folder emptied, a manifest broken) keeps the last good set."""
        try:
            result = self.data.scan()
        except (OwnDataError, OSError) as err:
            log.error("%s: rescan failed, training on the images of the last scan: %s",
                      device.device_id, err)
            return
        before, labels = self.result.train.ids, self.result.train.labels
        self.result = result
        if np.array_equal(before, result.train.ids) and np.array_equal(labels,
                                                                      result.train.labels):
            return  # the same images: keep the loaders (and their shuffling generators)
        added = np.setdiff1d(result.train.ids, before).size
        removed = np.setdiff1d(before, result.train.ids).size
        log.info("%s: own data changed: %d images added, %d removed (%d now)",
                 device.device_id, added, removed, len(result.train.ids))
        device.use_data(*self.device_args())
