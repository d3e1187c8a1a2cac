"""Which feature maps devices upload: the run's refresh policy, named in the run spec.

Policies (joined with "+"; "full" sends every map every round, as the reference):
  freeze:W  the extractor trains for rounds < W only, so later maps are bit-identical to
            what the hub holds and a round uploads ids, labels and logits alone
  drift:B   send a sample's map only when ||H - held|| / ||held|| > B
  delta     send s8 residuals H - held (rows past the drift bound, or all)
How a device carries them out: edge_runtime/device/refresh.py (docs/uplink.md).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_POLICY = "freeze:1"  # chosen by bench/bench_uplink.py (docs/uplink.md)


@dataclass(frozen=True)
class RefreshPolicy:
    warmup: int | None = None  # rounds the extractor trains; None: it always trains
    drift: float | None = None
    delta: bool = False

    @classmethod
    def parse(cls, spec: str) -> RefreshPolicy:
        warmup = drift = None
        delta = False
        for part in spec.split("+"):
            name, _, arg = part.strip().partition(":")
            try:
                if name == "full" and not arg:
                    continue
                if name == "freeze":
                    warmup = int(arg)
                    if warmup < 1:
                        raise ValueError
                elif name == "drift":
                    drift = float(arg)
                    if not drift >= 0:
                        raise ValueError
                elif name == "delta" and not arg:
                    delta = True
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad refresh policy part {part!r} in {spec!r}: use full, "
                                 "freeze:W (W >= 1 rounds), drift:B (B >= 0), delta, joined "
                                 "with +") from None
        return cls(warmup, drift, delta)

    def frozen(self, rnd: int) -> bool:
        return self.warmup is not None and rnd >= self.warmup

    @property
    def needs_values(self) -> bool:
        """Whether the device must keep the hub's reconstruction, not just its epoch."""
        return self.delta or self.drift is not None
