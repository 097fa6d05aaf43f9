"""``metassl analyze``: what a trained representation looks like (docs/analysis.md).

- :mod:`~metassl.analysis.features`: the network rebuilt from a checkpoint or an exported
  backbone, its feature spaces, extraction once into a tensor cache;
- :mod:`~metassl.analysis.redundancy`: label-free statistics (per-dimension, correlation,
  spectrum, effective rank, RankMe, alignment, uniformity), pure functions;
- :mod:`~metassl.analysis.ablation`: exact dimension-removal kNN and ridge-probe re-evaluation;
- :mod:`~metassl.analysis.background`: full vs foreground-only test images;
- :mod:`~metassl.analysis.embedding`: 2-D t-SNE / UMAP / PCA coordinates;
- :mod:`~metassl.analysis.figures` and :mod:`~metassl.analysis.report`: PNG pictures and the
  self-contained HTML page; :mod:`~metassl.analysis.pipeline` ties them together.

Importing this package is cheap: matplotlib and scikit-learn load only when a report is made.
"""

from metassl.analysis.redundancy import alignment, effective_rank, rankme, uniformity

__all__ = ["alignment", "effective_rank", "rankme", "uniformity", "run_analysis"]


def run_analysis(*args, **kwargs):
    """:func:`metassl.analysis.pipeline.run_analysis` (imported on first use)."""
    from metassl.analysis.pipeline import run_analysis as run

    return run(*args, **kwargs)
