"""A run before it starts: its spec (fresh run id) and the hub's held-out images."""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.learning.data import DataConfig, load_split, make_loader
from edge_runtime.learning.dataset_classes import dataset_classes
from edge_runtime.learning.preprocess import Preprocess, preprocess_of
from edge_runtime.protocol.codecs import FEATURE_CODEC, FEATURE_CODECS
from edge_runtime.protocol.run_spec import RunSpec, new_run_id
from server_hub.run.test_data import HeldOutImages
from server_hub.simulation.inproc import FederationConfig


@dataclass(frozen=True)
class RunPlan:
    spec: RunSpec  # run_id is fresh: spec_store.settle_run_spec keeps a saved one
    test: HeldOutImages | None = None  # own held-out images (--test-data)
    test_folder: str | None = None  # where they were read from (model delivery verifies on it)

    def test_loader(self, cfg: FederationConfig):
        """Batches of held-out data: own images, the academic test split, or None."""
        if self.test is not None:
            return make_loader(self.test.dataset(preprocess_of(self.spec)), 256, shuffle=False)
        if self.spec.dataset is None:
            return None
        plain = DataConfig(cfg.data.dataset, cfg.data.root, cfg.data.image_size, augment=False)
        return make_loader(load_split(plain, train=False).dataset, 256, shuffle=False)


def build_spec(cfg: FederationConfig, classes: tuple[str, ...], pre: Preprocess,
               dataset: str | None, codec: str = FEATURE_CODEC,
               codecs: tuple[str, ...] = FEATURE_CODECS, round_deadline: float = 300.0,
               upload_deadline: float = 600.0) -> RunSpec:
    """The spec of a run with ``cfg``'s training settings; its model seed is cfg.seed."""
    e = cfg.edge
    return RunSpec(new_run_id(), tuple(classes), pre.to_dict(), model_seed=cfg.seed,
                   epochs=e.epochs, batch_size=e.batch_size, lr=e.lr,
                   weight_decay=e.weight_decay, temperature=e.temperature, alpha=e.alpha,
                   codec=codec, codecs=codecs, refresh=cfg.refresh,
                   logits_codec=cfg.logits_codec, device_logits=cfg.server.distils,
                   round_deadline=round_deadline,
                   upload_deadline=upload_deadline, dataset=dataset)


def dataset_plan(cfg: FederationConfig, codec: str = FEATURE_CODEC, round_deadline: float = 300.0,
                 **kw) -> RunPlan:
    """An academic benchmark: devices load ``cfg.data.dataset``; the spec names its classes."""
    d = cfg.data
    pre = Preprocess(d.size, *d.normalization, resize="stretch")
    return RunPlan(build_spec(cfg, dataset_classes(d.dataset), pre, d.dataset, codec,
                              round_deadline=round_deadline, **kw))
