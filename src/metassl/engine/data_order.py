"""Data order and random state that a checkpoint can carry, for an exact mid-epoch resume.

Lightning restores the model, optimizers, schedulers and loop counters, but not where a plain
DataLoader was inside its epoch nor the random generators.  Here:

- :class:`ResumableSampler` draws the epoch's permutation as ``RandomSampler`` does (a seed taken
  from the global torch generator, so default runs see the same order as with ``shuffle=True``),
  or, with ``seeded=True`` (``trainer.deterministic=true``) or ``seeded_order=True``
  (``data.augment_on=device``, whose views are seeded per batch), from ``(seed, epoch)`` alone, so
  that runs with the same seed (a base method and base + regularizer) see the same order.  Its
  state (epoch, permutation seed, batches already trained) goes in the checkpoint; after a
  resume it yields the rest of that epoch only.
- :class:`SeededItems` makes each sample's augmentation a function of ``(seed, epoch, index)``
  (with ``seeded=True`` the sampler yields ``(epoch, index)`` keys), so the views do not depend
  on the global generator, the prefetching, or the number of workers.
- :func:`capture_rng` / :func:`restore_rng`: the torch (CPU, CUDA), NumPy and Python generators.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MIX = 1_000_003  # seed * _MIX + epoch: distinct generator seeds for every (seed, epoch) in range


class ResumableSampler(Sampler):
    """A shuffling sampler over ``range(n)`` whose position inside an epoch can be restored."""

    def __init__(self, n: int, *, seed: int = 0, seeded: bool = False, batch_size: int = 1,
                 seeded_order: bool | None = None) -> None:
        self.n, self.seed, self.seeded, self.batch_size = int(n), int(seed), bool(seeded), int(batch_size)
        self.seeded_order = self.seeded if seeded_order is None else bool(seeded_order)  # permutation from (seed, epoch)
        self.epoch = 0
        self.epoch_seed: int | None = None  # the permutation seed of the epoch being iterated
        self._resume: dict[str, int] | None = None  # a loaded state, applied to its own epoch only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:  # always the whole epoch: Lightning counts the resumed epoch's batches itself
        return self.n

    def _skip(self) -> int:
        r = self._resume
        return min(self.n, r["batches_done"] * self.batch_size) if r is not None and r["epoch"] == self.epoch else 0

    def __iter__(self) -> Iterator[Any]:
        r = self._resume
        skip = self._skip()
        if r is not None and r["epoch"] == self.epoch:
            seed = int(r["epoch_seed"])
        elif self.seeded_order:
            seed = self.seed * _MIX + self.epoch
        else:  # as torch's RandomSampler: one draw from the global generator per epoch
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self._resume = None
        self.epoch_seed = seed
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()[skip:]
        epoch = self.epoch
        for i in order:
            yield (epoch, i) if self.seeded else i

    def state_dict(self, batches_done: int) -> dict[str, int]:
        """The state after ``batches_done`` batches of the current epoch were trained."""
        return {"epoch": self.epoch, "epoch_seed": int(self.epoch_seed if self.epoch_seed is not None else 0),
                "batches_done": int(batches_done), "seeded": int(self.seeded), "n": self.n}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["n"]) != self.n:
            from metassl.errors import MetasslError

            raise MetasslError(f"the checkpoint was trained on {state['n']} images, this run has {self.n}; "
                               "resume with the run's own data settings (data.*)")
        resume = {k: int(state[k]) for k in ("epoch", "epoch_seed", "batches_done")}
        if resume["batches_done"] >= self.n // max(1, self.batch_size):  # saved at the end of its epoch
            self._resume, self.epoch = None, resume["epoch"] + 1
        else:
            self._resume, self.epoch = resume, resume["epoch"]


class SeededItems(Dataset):
    """``dataset[i]`` drawn under a generator seeded by ``(seed, epoch, i)``; keys are ``(epoch, i)``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * _MIX + int(epoch)) * _MIX + int(index))
            return self.dataset[int(index)]


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The seed of one training batch's views under ``data.augment_on=device``: distinct for every
    (seed, rank, epoch, batch), the same on a rerun and after a resume."""
    return ((((int(seed) * _MIX + int(rank)) * _MIX + int(epoch)) * _MIX + int(batch)) % (1 << 63))


def capture_rng() -> dict[str, Any]:
    """The generators' states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
