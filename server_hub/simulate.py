"""`gkt-hub simulate`: run a whole federation on one machine and report it."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from .federation import RUNNERS, FederationConfig, prepare
from .results import HEADER, RoundRecord, RunResult, format_row

log = logging.getLogger(__name__)


def simulate_inproc(cfg: FederationConfig, algorithm: str, show_progress: bool = True) -> RunResult:
    """All devices and the hub in this process; bytes are what would cross the network."""
    t0 = time.perf_counter()
    setup = prepare(cfg)
    sizes = ", ".join(str(len(s)) for s in setup.shards)
    print(f"{algorithm} on {cfg.data.dataset} ({cfg.data.size}x{cfg.data.size}), "
          f"{cfg.devices} devices [{sizes} samples], partition {cfg.partition}, "
          f"{cfg.rounds} rounds, seed {cfg.seed}")
    bar = tqdm(total=cfg.rounds, desc=algorithm, unit="round", disable=not show_progress,
               leave=False)
    bar.write(HEADER)

    def on_round(rec: RoundRecord) -> None:
        bar.write(format_row(rec))
        bar.set_postfix(acc=f"{rec.test_accuracy:.3f}")
        bar.update(1)

    result = RUNNERS[algorithm](cfg, setup, on_round)
    bar.close()
    final = result.final()
    print(f"final test accuracy {final['test_accuracy']:.4f} after {cfg.rounds} rounds; "
          f"{final['seconds']:.1f} s of rounds, {time.perf_counter() - t0:.1f} s in all")
    return result
