"""MetAug's score sets per base method: which keys each (real or generated) query faces
(docs/algorithms.md §4.7).

A *layout* holds, for the ``V = 2`` views the base losses use, the query of every local
sample ``i`` of view ``v`` and its candidates: one positive key ``pos_keys[v, i]`` and the
negative keys ``neg_keys[v]`` (``neg_mask[v, i, c]`` False where candidate ``c`` is no negative
of that row).  A generated query ``G_v(q_v,i)`` takes the place of ``q_v,i`` against the *same*
keys: generated features are only ever queries, never keys, and never enter a queue.

- **in-batch** (SimCLR): keys are both views of the global batch (gathered with gradient, as
  NT-Xent); the positive of ``z_v,i`` is ``z_u,i`` (``u`` the other view), the negatives are
  the ``2N − 2`` embeddings of the other images.  Its own column is no candidate.
- **queue** (MoCo v2): query ``q_v,i``, positive key ``k_u,i`` (momentum encoder), negatives
  the queue, read as it is (the method alone updates it, once per real step).
- **target** (BYOL, SimSiam, Barlow Twins, VICReg): no negatives in the base loss.  Query: the
  prediction ``p_v`` (BYOL, SimSiam) or the embedding ``z_v`` (Barlow Twins, VICReg); keys: the
  other view's target (BYOL's target network, else ``sg(z_u)``) of the global batch, detached;
  positive ``i``, negatives the ``N − 1`` other images.  **[design choice]** (§4.7).

The table is by method name: a new base method needs its entry here (``supports`` refuses it
with one line until then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision, gather_with_grad, rank
from metassl.methods.base import Method

__all__ = ["FAMILIES", "OFFICIAL_GAMMA", "VIEWS", "Layout", "default_gamma", "family_of", "is_contrastive", "layout_for",
           "layout_scores", "query_dim", "unsupported_reason"]

#: the views the base losses use
VIEWS = 2
#: score-set family of each supported base method
FAMILIES: dict[str, str] = {
    "simclr": "in_batch",
    "moco_v2": "queue",
    "byol": "target",
    "simsiam": "target",
    "barlow_twins": "target",
    "vicreg": "target",
}
#: the official γ (CMC + MetAug), used where the base method has no temperature
OFFICIAL_GAMMA = 16.0


def family_of(method_name: str) -> str:
    if method_name not in FAMILIES:
        raise ValueError(unsupported_reason(method_name))
    return FAMILIES[method_name]


def unsupported_reason(method_name: str) -> str | None:
    """``None`` for a supported base method, else one line naming the fix."""
    if method_name in FAMILIES:
        return None
    return (f"metaug has no score set for base method {method_name!r} (it has one for {', '.join(sorted(FAMILIES))}); "
            "add its entry to metassl/regularizers/metaug_scores.py")


def is_contrastive(method_name: str) -> bool:
    """The base loss is InfoNCE over these score sets (MetAug's unified loss replaces it)."""
    return family_of(method_name) in ("in_batch", "queue")


def default_gamma(method: Method) -> float:
    """``γ = 2 / τ`` for the contrastive bases (then the unified loss of the real scores *is*
    their InfoNCE), the official 16 otherwise."""
    if is_contrastive(method.name):
        return 2.0 / float(method.temperature)
    return OFFICIAL_GAMMA


def query_dim(method: Method) -> int:
    """Width of the query a generator maps: the predictor's output (BYOL, SimSiam) or the
    projector's."""
    head = method.predictor if family_of(method.name) == "target" and hasattr(method, "predictor") else method.projector
    return int(head.out_dim)


@dataclass(frozen=True)
class Layout:
    """Queries and candidates of the ``V`` views (module docstring).

    ``queries`` ``(V, n, D)`` (L2-normalised), ``pos_keys`` ``(V, n, D)``, ``neg_keys``
    ``(V, C, D)`` or ``(C, D)`` shared by the views, ``neg_mask`` ``(V, n, C)`` or None (all valid)."""

    queries: torch.Tensor
    pos_keys: torch.Tensor
    neg_keys: torch.Tensor
    neg_mask: torch.Tensor | None


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)


def _own_columns(n: int, device: torch.device) -> torch.Tensor:
    """Global indices of the local samples (rank-major global batch)."""
    return rank() * n + torch.arange(n, device=device)


def _in_batch(out: dict[str, Any]) -> Layout:
    z = [_normalize(t) for t in out["z"][:VIEWS]]
    n = z[0].shape[0]
    both = gather_with_grad(torch.stack(z, dim=1))  # (N, 2, D), one collective as NT-Xent
    big_n = both.shape[0]
    if big_n < 2:
        raise ValueError("metaug on simclr needs a global batch of at least 2 images (no negatives otherwise)")
    cands = torch.cat([both[:, 0], both[:, 1]], dim=0)  # (2N, D): all view-0, then all view-1
    g = _own_columns(n, z[0].device)
    rows = torch.arange(n, device=z[0].device)
    mask = torch.ones(VIEWS, n, 2 * big_n, dtype=torch.bool, device=z[0].device)
    for v in range(VIEWS):
        u = 1 - v
        mask[v, rows, g + v * big_n] = False  # itself
        mask[v, rows, g + u * big_n] = False  # its positive
    return Layout(torch.stack(z), torch.stack([z[1], z[0]]), cands, mask)


def _queue(method: Method, out: dict[str, Any]) -> Layout:
    q = [_normalize(t) for t in out["z"][:VIEWS]]
    k = [_normalize(t.detach()) for t in out["z_target"][:VIEWS]]
    queue = method.queue.detach().to(q[0].dtype)  # already normalised; read, never written
    return Layout(torch.stack(q), torch.stack([k[1], k[0]]), queue, None)


def _target(out: dict[str, Any]) -> Layout:
    q = [_normalize(t) for t in (out["p"] if "p" in out else out["z"])[:VIEWS]]
    targets = out["z_target"] if "z_target" in out else out["z"]
    keys = [_normalize(t.detach()) for t in targets[:VIEWS]]
    n = q[0].shape[0]
    # detached keys, gathered by the differentiable gather (safe inside torch.func transforms)
    gathered = gather_with_grad(torch.stack(keys, dim=1))  # (N, 2, D)
    big_n = gathered.shape[0]
    if big_n < 2:
        raise ValueError("metaug on a non-contrastive base needs a global batch of at least 2 images (no negatives otherwise)")
    mask = torch.ones(VIEWS, n, big_n, dtype=torch.bool, device=q[0].device)
    mask[:, torch.arange(n, device=q[0].device), _own_columns(n, q[0].device)] = False
    neg_keys = torch.stack([gathered[:, 1], gathered[:, 0]])  # view v faces the other view's targets
    return Layout(torch.stack(q), torch.stack([keys[1], keys[0]]), neg_keys, mask)


@full_precision
def layout_for(method: Method, out: dict[str, Any]) -> Layout:
    """The score layout of ``method``'s output ``out`` (module docstring), in full precision."""
    family = family_of(method.name)
    if family == "in_batch":
        return _in_batch(out)
    if family == "queue":
        return _queue(method, out)
    return _target(out)


@full_precision
def layout_scores(layout: Layout, queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores ``(pos (V, n, 1), neg (V, n, C))`` of ``queries`` ``(V, n, D)`` (default:
    the layout's real queries; generated ones face the same keys)."""
    q = layout.queries if queries is None else _normalize(queries)
    if q.shape != layout.queries.shape:
        raise ValueError(f"metaug: generated queries of shape {tuple(q.shape)} do not match the real ones {tuple(layout.queries.shape)}")
    pos = (q * layout.pos_keys.to(q.dtype)).sum(-1, keepdim=True)
    neg_keys = layout.neg_keys.to(q.dtype)
    neg = q @ neg_keys.transpose(-1, -2)
    return pos, neg
