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

    def load_state(self, state: dict[str, torch.Tensor], rekey: bool = False) -> None:
        """Restore saved logits. The saved ids must be this bank's, unless ``rekey``
        (a device's own data, where files come and go): then logits of ids still held
        are kept, those of ids gone are dropped, and new ids have none yet."""
        saved = LogitBank(state["ids"].numpy(), self.num_classes)
        if not rekey and not np.array_equal(saved.ids, self.ids):
            raise ValueError("saved logit bank belongs to a different set of samples")
        saved.logits = state["logits"].float().clone()
        saved.known = state["known"].bool().clone()
        if tuple(saved.logits.shape) != (len(saved.ids), self.num_classes):
            raise ValueError(f"saved logits {tuple(saved.logits.shape)} do not fit "
                             f"{self.num_classes} classes")
        self.rekey_from(saved)

    def rekey_from(self, old: LogitBank) -> None:
        """Take ``old``'s logits for the ids both banks hold; the rest stay unknown."""
        logits = torch.zeros(len(self.ids), self.num_classes)
        known = torch.zeros(len(self.ids), dtype=torch.bool)
        both, mine, theirs = np.intersect1d(self.ids, old.ids, assume_unique=True,
                                            return_indices=True)
        if len(both):
            logits[mine] = old.logits[theirs]
            known[mine] = old.known[theirs]
        self.logits, self.known = logits, known
