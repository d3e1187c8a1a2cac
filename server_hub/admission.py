"""What the hub admits into a round beyond the wire format, checked before it acknowledges
(and journals) anything, so that the journal only ever holds what training can use.

The wire decoder already refused malformed frames, NaN/Inf and absurd shapes. These rules
tie an upload to the run and to what the device actually sent:

- feature maps are ``[k, 16, S, S]`` with the run's S (the hub's input size, else the
  fleet's first accepted size) and ``|h| <= max_feature_abs``, so the server model's
  arithmetic stays finite (3e38 passes the decoder and overflows the first conv);
- an upload stores at most the sample count its device said hello with (itself at most
  ``max_device_samples``), at most that many chunks, and at most ``max_expansion`` decoded
  feature bytes per byte that crossed the network (all-zero chunks with a large declared
  shape compress ~30,000:1; honest uploads expand well under 16:1);
- ``upload_done`` must name exactly the number of distinct samples stored, so counters
  count what was stored, never what a device claims.

Every refusal is a ``Refusal`` (a ``WireError``) whose reason is a code the device is told
(``edge_runtime.protocol.refusal``) and whose ``fatal`` says whether a retry can help.
Pure functions: the intake calls them with the upload's running totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.protocol import refusal, wire
from edge_runtime.protocol.run_spec import RunSpec
from edge_runtime.protocol.schema import FEATURE_CHANNELS


@dataclass(frozen=True)
class AdmissionLimits:
    max_feature_abs: float = 1e4  # honest H (BN + ReLU output) stays below ~50
    max_expansion: float = 64.0  # decoded feature bytes per received byte, per upload
    max_device_samples: int = 1_000_000  # a hello claiming more is refused
    max_devices: int = 10_000  # registry size: hellos beyond it are refused


class Refusal(wire.WireError):
    """An upload message the run cannot use; ``fatal``: retrying cannot fix it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.fatal = reason in refusal.FATAL


@dataclass
class UploadTotals:
    """What one upload has stored so far (ids across its chunks, bytes in and decoded)."""

    ids: set[int]
    wire_bytes: int = 0
    feature_bytes: int = 0


def check_hello(meta: dict, num_classes: int, feature_size: int | None,
                limits: AdmissionLimits) -> None:
    ncls = meta.get("num_classes")
    if ncls != num_classes:
        raise Refusal(refusal.WRONG_RUN, f"the device has {ncls} classes, the run "
                                         f"{num_classes}")
    size = meta.get("image_size")
    if feature_size is not None and size is not None and size != feature_size:
        raise Refusal(refusal.WRONG_RUN, f"the device's images are {size}x{size}, the run's "
                                         f"{feature_size}x{feature_size}")
    if meta.get("num_samples", 0) > limits.max_device_samples:
        raise Refusal(refusal.TOO_MANY_SAMPLES,
                      f"hello claims {meta['num_samples']} samples; the hub takes at most "
                      f"{limits.max_device_samples} per device")


def check_chunk_count(chunks: int, hello_samples: int) -> None:
    """Every chunk holds at least one sample, so an upload has at most as many chunks as
    its device has samples (the wire allows up to 2^31-1)."""
    if chunks > max(hello_samples, 1):
        raise Refusal(refusal.TOO_MANY_CHUNKS, f"upload declares {chunks} chunks for "
                                               f"{hello_samples} samples")


def check_features(msg: wire.Message, feature_size: int | None, totals: UploadTotals,
                   hello_samples: int, limits: AdmissionLimits) -> int:
    """Check one feature chunk against the run and its upload's totals (not changed here);
    the feature size it establishes (``feature_size`` or the chunk's own)."""
    feats = msg.tensors["features"]
    _, channels, size, _ = feats.shape
    if channels != FEATURE_CHANNELS or (feature_size is not None and size != feature_size):
        want = feature_size if feature_size is not None else size
        raise Refusal(refusal.FEATURE_SHAPE, f"features {list(feats.shape[1:])}; the run's are "
                                             f"[{FEATURE_CHANNELS}, {want}, {want}]")
    check_chunk_count(msg.chunks, hello_samples)
    peak = float(np.abs(feats).max()) if feats.size else 0.0
    logits = msg.tensors.get("logits")
    logit_peak = float(np.abs(logits).max()) if logits is not None else 0.0
    if not (peak <= limits.max_feature_abs and logit_peak <= limits.max_feature_abs):
        raise Refusal(refusal.MAGNITUDE, f"|features| up to {peak:.3g}, |logits| up to "
                                         f"{logit_peak:.3g}; the bound is "
                                         f"{limits.max_feature_abs:g}")
    new = set(msg.tensors["ids"].tolist()) - totals.ids
    if len(totals.ids) + len(new) > hello_samples:
        raise Refusal(refusal.COUNT_MISMATCH,
                      f"upload would hold {len(totals.ids) + len(new)} samples; the device "
                      f"said hello with {hello_samples}")
    decoded = totals.feature_bytes + feats.size * 4
    received = totals.wire_bytes + msg_wire_bytes(msg)
    if decoded > limits.max_expansion * received:
        raise Refusal(refusal.EXPANSION, f"upload decodes to {decoded} feature bytes from "
                                         f"{received} received ({decoded / received:.0f}x; "
                                         f"the bound is {limits.max_expansion:g}x)")
    return size


def msg_wire_bytes(msg: wire.Message) -> int:
    """Tensor bytes as they crossed the network (the header is not counted)."""
    return sum(s.nbytes for s in msg.specs)


def check_done(claimed: int, stored: int) -> None:
    if claimed != stored:
        raise Refusal(refusal.COUNT_MISMATCH, f"upload_done claims {claimed} samples; "
                                              f"{stored} distinct samples arrived")


class ReplyLimiter:
    """At most ``burst`` refusal replies per device and reason per ``period`` seconds (a
    device that floods bad messages is counted, not answered each time)."""

    def __init__(self, burst: int = 5, period: float = 10.0) -> None:
        self.burst, self.period = burst, period
        self._sent: dict[str, list[float]] = {}

    def allow(self, device: str, reason: str, now: float) -> bool:
        key = f"{device}/{reason}"
        times = [t for t in self._sent.get(key, []) if now - t < self.period]
        ok = len(times) < self.burst
        if ok:
            times.append(now)
        self._sent[key] = times
        if len(self._sent) > 4 * 10_000:  # phantom ids: forget the quiet ones
            self._sent = {d: ts for d, ts in self._sent.items()
                          if ts and now - ts[-1] < self.period}
        return ok


def check_run_id(spec: RunSpec | None, device: str, meta: dict) -> None:
    """A device that adopted another run than the one this hub announced is refused. (A
    hello naming no run comes from an agent built without a spec, as tests and load
    generators do; its class count is still checked.)"""
    if spec is not None and "run_id" in meta and meta["run_id"] != spec.run_id:
        got = str(meta["run_id"])[:70]
        raise wire.WireError(refusal.WRONG_RUN,
                             f"device {device} adopted run {got}; this hub runs {spec.run_id}: "
                             "restart it with `gkt-edge run --new-run` to join this run "
                             "(its old run's files are kept aside)")
