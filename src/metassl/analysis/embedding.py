"""Two-dimensional pictures of a representation: t-SNE, UMAP, or PCA as the fallback.

- t-SNE (van der Maaten & Hinton, JMLR 2008) with scikit-learn, on the 50 leading principal
  components (the usual speed-up) of L2-normalised features, perplexity 30, PCA initialisation;
- UMAP (McInnes, Healy, Melville, arXiv:1802.03426) with ``umap-learn``, cosine metric, when it
  is installed;
- without scikit-learn: the first two principal components, and the report says so.

Points are a class-stratified, seeded subsample of at most ``max_points`` (t-SNE is quadratic in
memory and time without it).  Coordinates only; the pictures are drawn by
:mod:`metassl.analysis.figures`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["stratified_subsample", "available_methods", "embed_2d"]


def stratified_subsample(labels: torch.Tensor, max_points: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``max_points`` samples, each class kept in proportion (seeded)."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    labels = labels.reshape(-1)
    n = labels.numel()
    if n <= max_points:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    # interleave the classes: the j-th sample of every class before the (j+1)-th of any
    rank_in_class = torch.empty(n, dtype=torch.long)
    shuffled = labels[order]
    for c in torch.unique(shuffled):
        where = torch.nonzero(shuffled == c).flatten()
        rank_in_class[where] = torch.arange(where.numel()) * n // max(1, where.numel())
    keep = order[torch.argsort(rank_in_class, stable=True)[:max_points]]
    return keep.sort().values


def available_methods() -> list[str]:
    """``tsne`` with scikit-learn, ``umap`` with umap-learn, and always ``pca``."""
    found = [name for name, module in (("tsne", "sklearn"), ("umap", "umap")) if importlib.util.find_spec(module)]
    return found + ["pca"]


def _pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[: min(dims, v.shape[0])].T


def embed_2d(x: torch.Tensor, method: str = "tsne", seed: int = 0) -> torch.Tensor:
    """2-D coordinates ``(N, 2)`` of the rows of ``x`` (module docstring for each method)."""
    if method not in ("tsne", "umap", "pca"):
        raise ValueError(f"embedding method must be tsne, umap or pca; got {method!r}")
    if x.dim() != 2 or x.shape[0] < 3:
        raise ValueError(f"embed_2d needs at least 3 samples of shape (N, D); got {tuple(x.shape)}")
    xn = F.normalize(x.double(), dim=1)
    if method == "pca":
        return _pca(xn, 2).float()
    if method == "tsne":
        if importlib.util.find_spec("sklearn") is None:
            raise ValueError("t-SNE needs scikit-learn: pip install scikit-learn (or use method='pca')")
        from sklearn.manifold import TSNE

        reduced = _pca(xn, 50).numpy()
        perplexity = float(min(30.0, (x.shape[0] - 1) / 3.0))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
        return torch.from_numpy(coords).float()
    if importlib.util.find_spec("umap") is None:
        raise ValueError("UMAP needs umap-learn: pip install umap-learn (or use method='tsne')")
    import umap

    coords = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(xn.numpy())
    return torch.from_numpy(coords).float()
