"""Knowledge-distillation loss and the per-sample-id bank of teacher logits."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    p_teacher = F.softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (t * t)


class LogitBank:
    """Teacher logits for a fixed set of sample ids; lookup returns (logits, has_teacher)."""

    def __init__(self, ids: np.ndarray, num_classes: int) -> None:
        self.ids = np.sort(np.asarray(ids, dtype=np.int64))
        self.num_classes = num_classes
        self.logits = torch.zeros(len(self.ids), num_classes)
        self.known = torch.zeros(len(self.ids), dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.known.sum())

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, ids)
        ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
        if not ok.all():
            bad = ids[~ok][:5].tolist()
            raise ValueError(f"{int((~ok).sum())} sample ids are not in this bank, e.g. {bad}")
        return pos

    def update(self, ids: np.ndarray, logits: torch.Tensor) -> None:
        """Set logits for ``ids``; idempotent, so a resent chunk changes nothing."""
        ids = np.asarray(ids, dtype=np.int64)
        if tuple(logits.shape) != (len(ids), self.num_classes):
            raise ValueError(
                f"logits shape {tuple(logits.shape)} != ({len(ids)}, {self.num_classes})"
            )
        pos = torch.from_numpy(self._positions(ids))
        self.logits[pos] = logits.float()
        self.known[pos] = True

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.from_numpy(self._positions(ids.numpy().astype(np.int64)))
        return self.logits[pos], self.known[pos]

    def state(self) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.ids.copy())
        return {"ids": ids, "logits": self.logits, "known": self.known}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if not np.array_equal(state["ids"].numpy(), self.ids):
            raise ValueError("saved logit bank belongs to a different set of samples")
        self.logits = state["logits"].float().clone()
        self.known = state["known"].bool().clone()
