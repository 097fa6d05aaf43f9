"""Numerical faults: what a training step does when a loss term is NaN or infinite.

``trainer.skip_nonfinite_steps`` is the policy: 0 (default) stops at the first non-finite term
with one line naming the global step and the term; ``N > 0`` skips at most ``N`` such steps over
the whole run (their updates are not applied: no encoder step, no meta step, no EMA/queue/
dictionary update, no scheduler step) and stops at the next one.  The count is saved in every
checkpoint, so a resumed run keeps its budget.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from metassl.errors import DivergenceError


def first_nonfinite(values: Mapping[str, torch.Tensor | float]) -> str | None:
    """The name of the first value that is NaN or +-inf (``None`` when all are finite).

    Tensors are reduced on their device and read back once (one host sync for all of them)."""
    names, tensors = [], []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            names.append(name)
            tensors.append(torch.isfinite(value.detach()).all())
        elif not math.isfinite(float(value)):
            return name
    if not tensors:
        return None
    finite = torch.stack(tensors).cpu().tolist()
    for name, ok in zip(names, finite):
        if not ok:
            return name
    return None


def agree_across_ranks(bad: str | None, device: torch.device, distributed: bool) -> str | None:
    """Under data parallelism every rank must take the same decision (a rank that skips its
    backward while the others run theirs would hang the gradient all-reduce): one all-reduce of
    a flag; a rank whose own terms were finite reports ``"other_rank"``."""
    import torch.distributed as dist

    if not (distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bad
    flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bad if bad is not None or flag.item() == 0.0 else "other_rank"


def describe_term(name: str, method: str, regularizer: str) -> str:
    """Human words for a term key of :func:`metassl.engine.step.training_step`."""
    if name == "other_rank":
        return "a loss term on another process (data-parallel rank)"
    if name == "total":
        return "the total loss"
    if name == "base":
        return f"the base loss ({method})"
    if name.startswith("meta/"):
        return f"the meta objective of {regularizer} ({name})"
    return f"the regularizer term {name!r} of {regularizer}"


class NonFinitePolicy:
    """Counts skipped non-finite steps and raises :class:`DivergenceError` when the budget is spent."""

    def __init__(self, max_skips: int = 0, *, method: str = "?", regularizer: str = "none", hint: str = "") -> None:
        if max_skips < 0:
            raise ValueError(f"trainer.skip_nonfinite_steps={max_skips} must be >= 0")
        self.max_skips = int(max_skips)
        self.skipped = 0
        self.method, self.regularizer, self.hint = method, regularizer, hint

    def handle(self, term: str, global_step: int, value: float) -> None:
        """Record a non-finite ``term`` at ``global_step``: return to skip the step, or raise."""
        what = describe_term(term, self.method, self.regularizer)
        if self.skipped < self.max_skips:
            self.skipped += 1
            return
        budget = (f" after skipping {self.skipped} non-finite step(s) (trainer.skip_nonfinite_steps={self.max_skips})"
                  if self.max_skips else "")
        raise DivergenceError(
            f"training diverged: {what} is {value} at global step {global_step}{budget}; {self.hint}"
            "checkpoints/last.ckpt in the run folder holds the last good checkpoint (resume=auto continues from it)"
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
