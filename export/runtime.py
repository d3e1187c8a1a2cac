"""onnxruntime sessions with explicit thread counts, batched inference and latency medians."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort


def make_session(model: str | Path | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; graph optimizations happen here, in memory, at load time.

    Nothing optimized is written back: a graph optimized at the highest level is
    specialised to this machine's CPU and must not be shipped to another (e.g. ARM).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only; warnings about unused initializers are noise
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The first (only) output for input batch ``x``."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
