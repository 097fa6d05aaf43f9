"""ICL-MSR's confounder dictionary and backdoor adjustment (docs/algorithms.md §5.3, §5.5).

**[reconstruction]** The paper (Qiang et al., ICML 2022) states the adjustment
``P(Y | do(X)) = Σ_b P(Y | X, b) P(b)`` over background strata ``b``; how the strata are
represented and how the sum is evaluated is not published.  Here, as in interventional
few-shot learning (IFSL) and VC R-CNN (docs/algorithms.md §5.3):

- the strata are ``K`` prototypes ``d_k`` of the backbone feature space with a prior ``P(b_k)``
  (:class:`EMADictionary`: online k-means; :class:`LearnedDictionary`: a parameter table);
- the sum is moved inside the head by the normalised weighted geometric mean (NWGM), which
  for a head that is linear in its context input is one feature-level term
  (:func:`backdoor_adjust`, Eq. §5.3)::

      f_do = f + Σ_k P(b_k) · α_k(f) · W d_k,      α(f) = softmax_k( (Q f)ᵀ (K d_k) / √d_a )

Everything here is a pure function or a small module; the distributed reduction is the
caller's (the dictionary's ``update_`` methods receive the *global* batch, gathered in the
same order on every rank, so every rank computes the same dictionary).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "BackdoorAdjustment",
    "EMADictionary",
    "LearnedDictionary",
    "attention_weights",
    "backdoor_adjust",
    "ema_kmeans_step",
    "farthest_point_seeds",
    "kmeans_statistics",
    "reseed_dead",
    "squared_distances",
]

ATTENTIONS = ("dot", "none")
PRIORS = ("frequency", "uniform")


# -- pure functions ------------------------------------------------------------------------------
def squared_distances(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``‖x_i − d_k‖²`` as a ``(N, K)`` matrix (never below 0)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ prototypes.T + (prototypes * prototypes).sum(1)
    return d.clamp_min(0)


def farthest_point_seeds(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` rows of ``x`` by farthest-point traversal from row 0 (deterministic: every rank
    seeds the same dictionary from the same gathered batch).  With fewer than ``k`` distinct
    rows the traversal repeats from its start; the duplicates are never nearest to anything
    (ties go to the lower index), so their frequency decays and they are re-seeded as dead."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"farthest_point_seeds needs a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    chosen = [0]
    dist = ((x - x[0]) ** 2).sum(1)
    while len(chosen) < min(k, x.shape[0]):
        i = int(torch.argmax(dist))
        if float(dist[i]) <= 0.0:
            break
        chosen.append(i)
        dist = torch.minimum(dist, ((x - x[i]) ** 2).sum(1))
    return x[[chosen[j % len(chosen)] for j in range(k)]].clone()


def kmeans_statistics(x: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard assignment of every row of ``x`` to its nearest prototype: ``(assignment (N,),
    per-prototype sums (K, D), counts (K,))`` (by a one-hot product, not scattered atomics:
    deterministic on accelerators too, so every rank gets the same sums from the same batch)."""
    assign = torch.argmin(squared_distances(x, prototypes), dim=1)
    onehot = nn.functional.one_hot(assign, prototypes.shape[0]).to(prototypes.dtype)
    return assign, onehot.T @ x.to(prototypes.dtype), onehot.sum(0)


def ema_kmeans_step(
    prototypes: torch.Tensor, frequencies: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One online k-means step: ``d_k ← m d_k + (1 − m) mean_k`` for every prototype that got
    rows (the others keep their place) and ``P(b) ← m P(b) + (1 − m) counts / N``."""
    means = sums / counts.clamp_min(1).unsqueeze(1)
    hit = (counts > 0).unsqueeze(1)
    new_prototypes = torch.where(hit, momentum * prototypes + (1 - momentum) * means, prototypes)
    new_frequencies = momentum * frequencies + (1 - momentum) * counts / counts.sum().clamp_min(1)
    return new_prototypes, new_frequencies


def reseed_dead(
    prototypes: torch.Tensor, frequencies: torch.Tensor, x: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prototypes whose frequency fell below ``threshold / K`` are moved onto the rows of ``x``
    farthest from every live prototype (the worst-explained features; deterministic order),
    their frequency reset to ``1 / K``, and the frequencies renormalised to sum to 1.
    Returns ``(prototypes, frequencies, number re-seeded)``."""
    k = prototypes.shape[0]
    dead = frequencies < threshold / k
    n_dead = int(dead.sum())
    if n_dead == 0 or n_dead == k:
        return prototypes, frequencies, 0
    live = prototypes[~dead]
    far = squared_distances(x.to(prototypes.dtype), live).min(1).values
    order = torch.argsort(far, descending=True, stable=True)
    rows = order[torch.arange(n_dead, device=order.device) % order.numel()]
    prototypes = prototypes.clone()
    prototypes[dead] = x[rows].to(prototypes.dtype)
    frequencies = torch.where(dead, torch.full_like(frequencies, 1.0 / k), frequencies)
    return prototypes, frequencies / frequencies.sum(), n_dead


def attention_weights(f: torch.Tensor, prototypes: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``α(f) = softmax_k((Q f)ᵀ (K d_k) / √d_a)``, ``(B, K)`` (``query``, ``key``: ``(d_a, D)``)."""
    q = f @ query.T.to(f.dtype)
    kk = prototypes.to(f.dtype) @ key.T.to(f.dtype)
    return torch.softmax(q @ kk.T / q.shape[1] ** 0.5, dim=1)


def backdoor_adjust(
    f: torch.Tensor, prototypes: torch.Tensor, prior: torch.Tensor, value: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """The NWGM backdoor adjustment ``f_do = f + Σ_k P(b_k) α_k(f) W d_k`` (docs/algorithms.md
    §5.3); ``value`` is ``W`` ``(D, D)``, ``alpha`` ``(B, K)`` (all ones: no attention)."""
    context = (alpha * prior.to(alpha.dtype)) @ (prototypes.to(alpha.dtype) @ value.T.to(alpha.dtype))
    return f + context.to(f.dtype)


# -- modules -------------------------------------------------------------------------------------
class BackdoorAdjustment(nn.Module):
    """``f ↦ f_do`` with learnt ``Q, K`` (``attention="dot"``, ``d_a = attention_dim``) and
    ``W`` (standard ``nn.Linear`` initialisation, no biases).  ``attention="none"``: every
    ``α_k = 1``, i.e. ``f + W Σ_k P(b_k) d_k`` (the plain expectation over strata).  Encoder
    parameters: trained by the encoder objective."""

    def __init__(self, dim: int, attention_dim: int = 64, attention: str = "dot") -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}; got {attention!r}")
        self.attention = attention
        if attention == "dot":
            self.query = nn.Linear(dim, attention_dim, bias=False)
            self.key = nn.Linear(dim, attention_dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def alpha(self, f: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        if self.attention == "none":
            return torch.ones(f.shape[0], prototypes.shape[0], dtype=f.dtype, device=f.device)
        return attention_weights(f, prototypes, self.query.weight, self.key.weight)

    def forward(self, f: torch.Tensor, prototypes: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return backdoor_adjust(f, prototypes, prior, self.value.weight, self.alpha(f, prototypes))


class _Dictionary(nn.Module):
    """``K`` prototypes of dimension ``D``, their assignment frequencies (EMA, a buffer) and
    whether they were seeded (a buffer, so checkpoints resume it)."""

    kind = ""

    def __init__(self, num_prototypes: int, dim: int, prior: str = "frequency", momentum: float = 0.99) -> None:
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}; got {prior!r}")
        self.prior_mode, self.momentum = prior, float(momentum)
        self.num_prototypes, self.dim = int(num_prototypes), int(dim)
        self.register_buffer("frequencies", torch.full((num_prototypes,), 1.0 / num_prototypes))
        self.register_buffer("seeded", torch.zeros((), dtype=torch.long))  # 0 / 1 (an integer: compared like any buffer)
        self.last_reseeded = 0

    prototypes: torch.Tensor

    def prior(self) -> torch.Tensor:
        """``P(b)``: the assignment frequencies, or uniform."""
        if self.prior_mode == "uniform":
            return torch.full_like(self.frequencies, 1.0 / self.num_prototypes)
        return self.frequencies

    @torch.no_grad()
    def seed_(self, features: torch.Tensor) -> None:
        """Prototypes from the first (global) batch by farthest-point traversal."""
        self.prototypes.copy_(farthest_point_seeds(features.to(self.prototypes.dtype), self.num_prototypes))
        self.seeded.fill_(1)

    def stats(self) -> dict[str, Any]:
        p = self.prior().detach().double().clamp_min(1e-30)
        return {"effective_strata": float(torch.exp(-(p * p.log()).sum())), "reseeded": float(self.last_reseeded)}


class EMADictionary(_Dictionary):
    """Online k-means of backbone features (buffers): every real step assigns the batch to the
    nearest prototypes, takes one EMA step of the prototypes and of the frequencies
    (:func:`ema_kmeans_step`) and re-seeds dead prototypes (:func:`reseed_dead`)."""

    kind = "ema"

    def __init__(self, num_prototypes: int, dim: int, prior: str = "frequency", momentum: float = 0.99, dead_threshold: float = 0.1) -> None:
        super().__init__(num_prototypes, dim, prior, momentum)
        self.dead_threshold = float(dead_threshold)
        self.register_buffer("prototypes", torch.zeros(num_prototypes, dim))

    @torch.no_grad()
    def update_(self, features: torch.Tensor) -> None:
        """One step on the global batch ``features`` ``(N, D)`` (the same on every rank)."""
        x = features.detach().to(self.prototypes.dtype)
        _, sums, counts = kmeans_statistics(x, self.prototypes)
        protos, freqs = ema_kmeans_step(self.prototypes, self.frequencies, sums, counts, self.momentum)
        protos, freqs, self.last_reseeded = reseed_dead(protos, freqs, x, self.dead_threshold)
        self.prototypes.copy_(protos)
        self.frequencies.copy_(freqs)


class LearnedDictionary(_Dictionary):
    """A parameter table trained with the encoder; the frequencies (``prior="frequency"``)
    are an EMA of the batch mean of the attention weights ``α`` (its soft assignments)."""

    kind = "learned"

    def __init__(self, num_prototypes: int, dim: int, prior: str = "frequency", momentum: float = 0.99) -> None:
        super().__init__(num_prototypes, dim, prior, momentum)
        self.prototypes = nn.Parameter(torch.zeros(num_prototypes, dim))

    @torch.no_grad()
    def update_(self, alpha: torch.Tensor) -> None:
        """``P(b) ← m P(b) + (1 − m) mean_i α_i`` over the global batch ``alpha`` ``(N, K)``."""
        mean = alpha.detach().to(self.frequencies.dtype).mean(0)
        self.frequencies.mul_(self.momentum).add_(mean / mean.sum(), alpha=1 - self.momentum)
