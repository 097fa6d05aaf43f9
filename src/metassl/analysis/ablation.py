"""Dimension removal: which feature dimensions help, and which hurt, the evaluation.

MetaMask's motivating experiment (docs/algorithms.md §3.1; docs/analysis.md "Confounder
dimensions"): drop one dimension (or a group of them) from a trained representation and
re-evaluate; a dimension whose removal *raises* the accuracy is a dimensional confounder.
Both evaluations here are exact re-evaluations, computed once from cached features:

- :func:`knn_removal` — the weighted cosine kNN of docs/algorithms.md §7.1 with the group ``G``
  removed, i.e. on ``normalize(x with x_G = 0)``.  With ``x̂ = x / ‖x‖`` the similarity without
  ``G`` is a rank-``|G|`` update of the full one, rescaled per row and column:
  ``s'_ij = (s_ij − x̂_iGᵀ x̂_jG) · a_iG · b_jG`` with ``a_iG = 1/sqrt(1 − ‖x̂_iG‖²)`` (``b`` the
  same for the bank).  The full similarities are computed once per block of queries; each removal
  is one rank-``|G|`` product against the whole bank (no candidate set, so nothing to certify).
  The new top ``k`` is selected without a top-``k`` over the bank: the smallest new similarity
  among the query's old ``k`` nearest is a lower bound of its new ``k``-th, so only the entries at
  or above it (``k`` plus the few a removal lifts past them) are compacted and ranked.  ``a_iG``
  does not change a row's order and is applied to those ``k`` values only.  The result is the
  brute-force one (tests compare them).
- :func:`ridge_removal` — a least-squares linear probe (ridge regression onto one-hot labels on
  standardised features, λ chosen on a validation split of train).  Re-fitting it without ``G``
  is exact from the inverse ``P = (XᵀX/n + λI)⁻¹`` of the full fit:
  ``W' = W − P[:, G] P[G, G]⁻¹ W[G]`` (the block-inverse downdate), ``W'[G] = 0``.

Each removal gets the accuracy change, the queries it fixes and breaks, and the exact two-sided
McNemar p-value of that paired change; ``flagged`` marks a removal that raises accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "dimension_groups",
    "RemovalResult",
    "knn_removal",
    "ridge_removal",
    "mcnemar_p",
    "rank_correlation",
]

_CHUNK_ELEMENTS = 1 << 24  # similarity block of at most 16M entries, as metassl.eval.knn
_TINY = 1e-12


def dimension_groups(dim: int, group_size: int) -> list[torch.Tensor]:
    """Consecutive groups of ``group_size`` dimensions (the last one may be shorter)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (1 = single dimensions); got {group_size!r}")
    if group_size >= dim:
        raise ValueError(f"group_size={group_size} would remove all {dim} dimensions at once; choose a group_size below {dim}")
    return [torch.arange(s, min(s + group_size, dim)) for s in range(0, dim, group_size)]


@dataclass
class RemovalResult:
    """Accuracy of the full features and of every removal, with the paired statistics."""

    groups: list[torch.Tensor]
    base_accuracy: float
    accuracies: torch.Tensor  # (G,)
    fixed: torch.Tensor  # (G,) queries wrong before and right after the removal
    broken: torch.Tensor  # (G,) right before, wrong after

    @property
    def gains(self) -> torch.Tensor:
        return self.accuracies - self.base_accuracy

    def rows(self, alpha: float = 0.05) -> list[dict]:
        """One record per removal, most harmful dimension first (largest gain); ``significant``
        is McNemar's test at ``alpha`` with a Bonferroni correction over the removals."""
        out, groups = [], self.groups
        for i, g in enumerate(groups):
            p = mcnemar_p(int(self.fixed[i]), int(self.broken[i]))
            gain = float(self.gains[i])
            out.append({"dims": [int(d) for d in g], "accuracy": float(self.accuracies[i]), "gain": gain,
                        "fixed": int(self.fixed[i]), "broken": int(self.broken[i]), "p_value": p,
                        "flagged": gain > 0, "significant": gain > 0 and p < alpha / max(1, len(groups))})
        return sorted(out, key=lambda r: -r["gain"])


def _check_features(bank, bank_y, query, query_y, num_classes):
    if bank.dim() != 2 or query.dim() != 2 or bank.shape[1] != query.shape[1]:
        raise ValueError(f"bank and query features must be (N, D) with the same D; got {tuple(bank.shape)} and {tuple(query.shape)}")
    if bank_y.numel() != bank.shape[0] or query_y.numel() != query.shape[0]:
        raise ValueError("one label per feature row is needed for the bank and the queries")
    if int(bank_y.min()) < 0 or int(bank_y.max()) >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes})")


def _vote(top_sim: torch.Tensor, top_labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Predicted class of the weighted vote of docs/algorithms.md §7.1 (as metassl.eval.knn)."""
    weights = torch.exp((top_sim - top_sim[:, :1]) / t)
    scores = torch.zeros(top_sim.shape[0], num_classes, dtype=weights.dtype, device=top_sim.device)
    scores.scatter_add_(1, top_labels, weights)
    return (scores / scores.sum(1, keepdim=True)).argmax(1)


def _group_sums(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sums over consecutive blocks of ``group_size`` entries of the last axis (the last block
    may be shorter): ``(..., D) -> (..., G)``."""
    pad = (-x.shape[-1]) % group_size
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group_size).sum(-1)


def _rest_scale(unit: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖x̂_G‖², 1 / ‖x̂ without G‖)`` per row and group, float64; the scale is 0 where nothing
    is left (the row becomes 0, as ``F.normalize`` of a zero vector)."""
    sq = unit.double().square()
    part = _group_sums(sq, group_size)
    rest = (sq.sum(-1, keepdim=True) - part).clamp_(min=0.0)
    return part, torch.where(rest > _TINY, rest.rsqrt(), torch.zeros_like(rest))


def _removal_top(sim, q_cols, group_cols, bank_scale, q_scale, old_top, k: int):
    """New top ``k`` (values, bank indices) of the query rows ``sim`` (similarities to the whole
    bank) with one group removed: ``(sim − q_G x_Gᵀ) · b`` ranked, the ``k`` best times ``a``.
    ``old_top`` (the rows' previous ``k`` nearest) gives the floor of the module docstring; a
    vanished query (``a_i = 0``) is 0 against every bank row, as ``F.normalize`` of a zero vector."""
    full = torch.addmm(sim, q_cols, group_cols, alpha=-1.0).mul_(bank_scale)  # (r, m), not yet times a_i
    vanished = q_scale <= 0
    if bool(vanished.any()):
        full[vanished] = 0.0
    floor = full.gather(1, old_top).amin(1, keepdim=True)  # the old k neighbours are k entries above it
    rows, cols = (full >= floor).nonzero(as_tuple=True)  # row-major
    counts = torch.bincount(rows, minlength=full.shape[0])
    pos = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max())
    dense = torch.full((full.shape[0], width), -math.inf, dtype=full.dtype)
    dense[rows, pos] = full[rows, cols]
    index = torch.zeros(full.shape[0], width, dtype=torch.long)
    index[rows, pos] = cols
    top, at = dense.topk(k, dim=1)
    return top * q_scale[:, None], index.gather(1, at)


@torch.no_grad()
def knn_removal(
    bank: torch.Tensor,
    bank_y: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    num_classes: int,
    group_size: int,
    *,
    k: int = 200,
    t: float = 0.1,
    dtype: torch.dtype = torch.float32,
    chunk_elements: int = _CHUNK_ELEMENTS,
    rows_per_block: int | None = None,
) -> RemovalResult:
    """kNN accuracy with each group of :func:`dimension_groups` removed (module docstring: exact,
    from one similarity block per ``chunk_elements``).  Every removal of a block of
    ``rows_per_block`` queries (default: a block of about 4 MB, which stays in cache across the
    removals) is one small matrix product and one pass over the block."""
    _check_features(bank, bank_y, query, query_y, num_classes)
    if int(k) < 1 or not float(t) > 0:
        raise ValueError(f"k must be >= 1 and t > 0; got k={k}, t={t}")
    groups = dimension_groups(bank.shape[1], group_size)
    g = int(group_size)
    bank_u, query_u = F.normalize(bank.to(dtype), dim=1), F.normalize(query.to(dtype), dim=1)
    bank_y, query_y = bank_y.reshape(-1).long(), query_y.reshape(-1).long()
    m, n, n_groups = bank_u.shape[0], query_u.shape[0], len(groups)
    k = min(int(k), m)
    _, bank_scale = _rest_scale(bank_u, g)  # (m, G)
    bank_scale = bank_scale.to(dtype).T.contiguous()  # (G, m)
    group_cols = [bank_u[:, cols].T.contiguous() for cols in groups]  # (|G|, m) each
    base_ok = torch.zeros(n, dtype=torch.bool)
    removed_ok = torch.zeros(n, n_groups, dtype=torch.bool)
    outer = max(1, chunk_elements // m)
    inner = max(1, rows_per_block or (1 << 20) // m)
    for start in range(0, n, outer):
        q, y = query_u[start : start + outer], query_y[start : start + outer]
        sim = q @ bank_u.T
        old_sim, old_top = sim.topk(k, dim=1)
        base_ok[start : start + q.shape[0]] = _vote(old_sim, bank_y[old_top], num_classes, t) == y
        _, q_scale = _rest_scale(q, g)  # (c, G)
        q_scale = q_scale.to(dtype)
        pred = torch.empty(q.shape[0], n_groups, dtype=torch.long)
        for s in range(0, q.shape[0], inner):
            sl = slice(s, s + inner)
            for gi, cols in enumerate(groups):
                top_sim, top_idx = _removal_top(sim[sl], q[sl][:, cols], group_cols[gi], bank_scale[gi], q_scale[sl, gi],
                                                old_top[sl], k)
                pred[sl, gi] = _vote(top_sim, bank_y[top_idx], num_classes, t)
        removed_ok[start : start + q.shape[0]] = pred == y[:, None]
    return RemovalResult(
        groups=groups, base_accuracy=float(base_ok.double().mean()), accuracies=removed_ok.double().mean(0),
        fixed=(removed_ok & ~base_ok[:, None]).sum(0), broken=(~removed_ok & base_ok[:, None]).sum(0),
    )


def _standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False)
    std = torch.where(std > _TINY, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train_x, *others)]


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float):
    """``(W, bias, P)``: ridge regression of one-hot ``y`` on centred ``x``, ``P = (XᵀX/n + λI)⁻¹``."""
    n, d = x.shape
    onehot = F.one_hot(y, num_classes).double()
    bias = onehot.mean(0)
    p = torch.linalg.inv(x.T @ x / n + lam * torch.eye(d, dtype=x.dtype))
    w = p @ (x.T @ (onehot - bias) / n)
    return w, bias, p


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


@torch.no_grad()
def ridge_removal(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    group_size: int,
    *,
    lambdas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[RemovalResult, float]:
    """Test accuracy of the ridge probe with each group removed (exact refits, module
    docstring) and the λ chosen on a validation split carved from train (never on test)."""
    _check_features(train_x, train_y, test_x, test_y, num_classes)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = dimension_groups(train_x.shape[1], group_size)
    train_y, test_y = train_y.reshape(-1).long(), test_y.reshape(-1).long()
    fit_idx, val_idx = _split(train_x.shape[0], val_fraction, seed)
    xf, xv = _standardise(train_x[fit_idx].double(), train_x[val_idx].double())
    scores = []
    for lam in lambdas:
        w, b, _ = _ridge_fit(xf - xf.mean(0), train_y[fit_idx], num_classes, lam)
        scores.append(float(((xv - xf.mean(0)) @ w + b).argmax(1).eq(train_y[val_idx]).double().mean()))
    lam = lambdas[max(range(len(lambdas)), key=lambda i: (scores[i], -i))]  # ties: the smaller λ
    xt, xs = _standardise(train_x.double(), test_x.double())
    center = xt.mean(0)
    w, b, p = _ridge_fit(xt - center, train_y, num_classes, lam)
    xs = xs - center
    base_ok = (xs @ w + b).argmax(1) == test_y
    removed_ok = torch.zeros(len(groups), xs.shape[0], dtype=torch.bool)
    for gi, g in enumerate(groups):
        w_g = w - p[:, g] @ torch.linalg.solve(p[g][:, g], w[g])
        w_g[g] = 0.0
        removed_ok[gi] = (xs @ w_g + b).argmax(1) == test_y
    result = RemovalResult(
        groups=groups, base_accuracy=float(base_ok.double().mean()), accuracies=removed_ok.double().mean(1),
        fixed=(removed_ok & ~base_ok).sum(1), broken=(~removed_ok & base_ok).sum(1),
    )
    return result, float(lam)


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value of ``fixed`` vs ``broken`` discordant queries
    (binomial test of ``min(fixed, broken)`` under ``Bin(fixed + broken, 1/2)``)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    low = min(fixed, broken)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(low + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros_like(values).scatter_add_(0, inverse, ranks)
    counts = torch.zeros_like(values).scatter_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation (Pearson correlation of average ranks); None when either
    side is constant or fewer than 3 values are given."""
    if a.numel() != b.numel():
        raise ValueError(f"rank_correlation needs two vectors of the same length; got {a.numel()} and {b.numel()}")
    if a.numel() < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra @ rb) / denom) if denom > 0 else None
