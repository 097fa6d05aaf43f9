"""``metassl analyze``: features once, then every number and picture of the report.

:func:`analyze_features` turns a :class:`~metassl.analysis.features.FeatureSet` into the
``analysis.json`` record and the PNG pictures (pure given the features); :func:`run_analysis`
rebuilds the run(s), extracts or reads the cached features and writes ``report.html`` and
``analysis.json`` (docs/analysis.md explains every entry).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from metassl.analysis import ablation, figures, redundancy
from metassl.analysis.background import background_dependence, background_sensitivity, foreground_test_split
from metassl.analysis.embedding import available_methods, embed_2d, stratified_subsample
from metassl.analysis.features import (
    FeatureSet,
    Source,
    extract_feature_set,
    load_source,
    per_dimension_gate,
    resolve_extraction_precision,
)
from metassl.errors import MetasslError
from metassl.eval.knn import knn_accuracy

__all__ = ["AnalysisOptions", "auto_group_size", "analyze_features", "analyze_source", "run_analysis"]


@dataclass
class AnalysisOptions:
    """Knobs of the analysis (CLI flags of ``metassl analyze``)."""

    group_size: int | None = None  # dimensions removed together; None: 1 up to 128 dims, else 8
    linear: bool = True  # also the ridge-probe ablation
    num_pairs: int = 1000  # test images with two augmentations, for the alignment
    max_points: int = 2000  # points of the 2-D embedding
    embeddings: tuple[str, ...] | None = None  # None: t-SNE and UMAP where installed, else PCA
    dead_tol: float = 1e-2
    redundancy_threshold: float = 0.9
    device: str = "cpu"
    precision: str = "auto"  # feature extraction: auto (bf16 where native, as training) | fp32 | bf16 (autocast + channels-last)
    batch_size: int | None = None  # None: eval.batch_size of the run


def auto_group_size(dim: int) -> int:
    """Single dimensions up to 128, groups of 8 above (64 removals at 512-d)."""
    return 1 if dim <= 128 else 8


def _space_record(x: torch.Tensor, pairs: torch.Tensor | None, opts: AnalysisOptions, bank, bank_y, y, num_classes, k, t):
    stats = redundancy.dimension_stats(x, opts.dead_tol)
    corr = redundancy.correlation_matrix(x)
    spectrum = redundancy.singular_spectrum(x)
    record = {
        "dim": int(x.shape[1]), "samples": int(x.shape[0]), "dead_fraction": stats["dead_fraction"],
        "dead_dims": [int(i) for i in torch.nonzero(stats["dead"]).flatten()],
        "off_diagonal_energy": redundancy.off_diagonal_energy(corr),
        "redundant": redundancy.redundant_pairs(corr, opts.redundancy_threshold),
        "effective_rank": redundancy.effective_rank(spectrum), "rankme": redundancy.rankme(x),
        "rank_99": redundancy.explained_variance_rank(spectrum, 0.99),
        "uniformity": redundancy.uniformity(x), "alignment": None,
        "knn": knn_accuracy(bank, bank_y, x, y, num_classes, k=k, t=t) if bank is not None else None,
        "mean": stats["mean"].tolist(), "std": stats["std"].tolist(),
        "singular_values": spectrum.tolist(),
    }
    if pairs is not None:
        record["alignment"] = redundancy.alignment(pairs[0], pairs[1])
        record["alignment_pairs"] = int(pairs.shape[1])
    return record, corr, stats, spectrum


def _group_mean(values: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([values[g].double().mean() for g in groups])


def _ablation_record(fs: FeatureSet, space: str, group_size: int, num_classes, k, t, linear: bool, seed: int):
    """The removal record of one space and the kNN result (for the pictures)."""
    train, test = fs.splits["train"][space], fs.splits["test"][space]
    knn = ablation.knn_removal(train, fs.labels["train"], test, fs.labels["test"], num_classes, group_size, k=k, t=t)
    record: dict[str, Any] = {"group_size": int(group_size), "removals": len(knn.groups),
                              "knn": {"base_accuracy": knn.base_accuracy, "rows": knn.rows()}}
    if linear:
        probe, lam = ablation.ridge_removal(train, fs.labels["train"], test, fs.labels["test"], num_classes, group_size,
                                            seed=seed)
        record["linear"] = {"probe": "ridge regression onto one-hot labels", "lambda": lam,
                            "base_accuracy": probe.base_accuracy, "rows": probe.rows()}
    return record, knn


def analyze_features(fs: FeatureSet, source: Source, opts: AnalysisOptions, *, tag: str = "") -> tuple[dict, dict[str, bytes]]:
    """Every number (JSON-ready dict) and picture (name → PNG) of one run's report."""
    cfg = source.cfg
    k, t = int(cfg["eval"]["knn"]["k"]), float(cfg["eval"]["knn"]["t"])
    num_classes, seed = int(source.bundle.num_classes), int(cfg.get("seed", 0))
    classes = list(source.bundle.classes) or [str(i) for i in range(num_classes)]
    timings: dict[str, float] = {}
    pics: dict[str, bytes] = {}
    result: dict[str, Any] = {"run": dict(source.info), "knn": {"k": k, "t": t, "bank": "labelled train split"},
                              "evaluated_space": source.evaluated_space(), "spaces": {}}
    bank_y, y = fs.labels["train"], fs.labels["test"]
    gate = per_dimension_gate(source.transform, source.feat_dim)

    clock = time.perf_counter()
    spectra = {}
    ablated = list(dict.fromkeys([source.evaluated_space(), "backbone"]))
    for space, x in fs.splits["test"].items():
        bank = None if space in ablated else fs.splits["train"][space]  # ablated spaces: the removal's base kNN
        record, corr, stats, spectrum = _space_record(x, fs.pairs.get(space), opts, bank, bank_y, y, num_classes, k, t)
        result["spaces"][space] = record
        spectra[space] = spectrum
        pics[f"{tag}corr_{space}"] = figures.correlation_heatmap(corr, f"{space}: |correlation| ({record['dim']} dims)")
        pics[f"{tag}dims_{space}"] = figures.dimension_plot(
            stats["std"], stats["dead"], f"{space}: per-dimension std ({stats['dead_fraction']:.0%} dead)",
            gate if space == "backbone" else None)
    pics[f"{tag}spectrum"] = figures.spectrum_plot(spectra, "singular-value spectrum (test split, centred)")
    timings["statistics"] = time.perf_counter() - clock

    clock = time.perf_counter()
    result["ablation"] = {}
    for space in ablated:
        dim = fs.splits["test"][space].shape[1]
        record, knn = _ablation_record(fs, space, opts.group_size or auto_group_size(dim), num_classes, k, t,
                                       opts.linear, seed)
        groups, gains = knn.groups, knn.gains
        result["spaces"][space]["knn"] = knn.base_accuracy
        labels = [f"{int(g[0])}" if g.numel() == 1 else f"{int(g[0])}-{int(g[-1])}" for g in groups]
        significant = {tuple(r["dims"]): r["significant"] for r in record["knn"]["rows"]}
        pics[f"{tag}ablation_{space}"] = figures.ablation_plot(
            gains.tolist(), labels, f"{space}: kNN accuracy change when dims are removed",
            [significant[tuple(int(d) for d in g)] for g in groups])
        if gate is not None and space == "backbone":
            gate_g, importance = _group_mean(gate, groups), -gains
            flagged = gains > 0
            record["mask_comparison"] = {
                "spearman_mask_vs_importance": ablation.rank_correlation(gate_g, importance),
                "mean_mask_flagged": float(gate_g[flagged].mean()) if bool(flagged.any()) else None,
                "mean_mask_others": float(gate_g[~flagged].mean()) if bool((~flagged).any()) else None,
                "mask": gate.tolist(),
            }
            pics[f"{tag}mask_{space}"] = figures.gate_scatter(gate_g, importance, "learned mask vs importance (kNN)")
        result["ablation"][space] = record
    timings["ablation"] = time.perf_counter() - clock

    clock = time.perf_counter()
    space = source.evaluated_space()
    if "test_foreground" in fs.splits:
        full, fg = fs.splits["test"][space], fs.splits["test_foreground"][space]
        bg = background_dependence(fs.splits["train"][space], bank_y, full, y, fg, num_classes, k=k, t=t,
                                   bank_backgrounds=fs.backgrounds.get("train"), test_backgrounds=fs.backgrounds.get("test"))
        sensitivity = background_sensitivity(full, fg)
        bg["space"], bg["sensitivity"] = space, sensitivity.tolist()
        groups = ablation.dimension_groups(full.shape[1], opts.group_size or auto_group_size(full.shape[1]))
        gains = torch.tensor([0.0] * len(groups), dtype=torch.float64)
        for row in result["ablation"][space]["knn"]["rows"]:
            gains[row["dims"][0] // groups[0].numel()] = row["gain"]
        bg["spearman_sensitivity_vs_removal_gain"] = ablation.rank_correlation(_group_mean(sensitivity, groups), gains)
        result["background"] = bg
        pics[f"{tag}background"] = figures.background_bars(bg["per_class_full"], bg["per_class_foreground"], classes,
                                                           f"{space}: kNN, full vs foreground-only test images")
    else:
        result["background"] = None
    timings["background"] = time.perf_counter() - clock

    clock = time.perf_counter()
    idx = stratified_subsample(y, opts.max_points, seed)
    methods = list(opts.embeddings) if opts.embeddings else [m for m in available_methods() if m != "pca"] or ["pca"]
    result["embedding"] = {"space": space, "points": int(idx.numel()), "methods": methods,
                           "note": None if "tsne" in methods or opts.embeddings else
                           "scikit-learn is not installed: PCA instead of t-SNE (pip install scikit-learn)"}
    for method in methods:
        coords = embed_2d(fs.splits["test"][space][idx], method, seed)
        pics[f"{tag}embedding_{method}"] = figures.embedding_scatter(coords, y[idx], classes, f"{space}: {method.upper()}")
    timings["embedding"] = time.perf_counter() - clock
    result["timings_s"] = timings
    return result, pics


def analyze_source(source: Source, out_dir: Path, opts: AnalysisOptions, *, cache_name: str = "features.pt",
                   tag: str = "") -> tuple[dict, dict[str, bytes]]:
    """Features (cached in ``out_dir/cache_name``) and :func:`analyze_features` for one run."""
    clock = time.perf_counter()
    foreground, fill = foreground_test_split(source.bundle, source.cfg["data"])
    batch = int(opts.batch_size or source.cfg["eval"].get("batch_size", 256))
    fs = extract_feature_set(source, out_dir / cache_name, foreground_test=foreground, num_pairs=opts.num_pairs,
                             batch_size=batch, device=opts.device, seed=int(source.cfg.get("seed", 0)),
                             precision=opts.precision)
    extract_s = time.perf_counter() - clock
    result, pics = analyze_features(fs, source, opts, tag=tag)
    result["timings_s"] = {"features": extract_s, **result["timings_s"]}
    result["features"] = {"cache": str(out_dir / cache_name), "from_cache": fs.cached,
                          "splits": {s: int(v["backbone"].shape[0]) for s, v in fs.splits.items()},
                          "spaces": list(fs.splits["test"]), "foreground_fill": fill,
                          "precision": resolve_extraction_precision(opts.precision, opts.device)}
    return result, pics


def run_analysis(ckpt: str | Path, overrides: Iterable[str] = (), *, out: str | Path | None = None,
                 compare: str | Path | None = None, backbone: str | None = None,
                 opts: AnalysisOptions | None = None) -> Path:
    """Analyse ``ckpt`` (and ``compare`` beside it) and write ``report.html`` + ``analysis.json``
    to ``out`` (default ``<run folder>/analysis``); returns the report's path."""
    from metassl.analysis.report import write_report

    opts = opts or AnalysisOptions()
    overrides = list(overrides)
    source = load_source(ckpt, overrides, backbone)
    out_dir = Path(out) if out is not None else (source.run_dir or Path(ckpt).parent) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [analyze_source(source, out_dir, opts, tag="a_")]
    if compare is not None:
        other = load_source(compare, overrides, backbone)
        if other.bundle.num_classes != source.bundle.num_classes:
            raise MetasslError(f"--compare {compare}: its data has {other.bundle.num_classes} classes, {ckpt} has "
                               f"{source.bundle.num_classes}; compare runs on the same data")
        runs.append(analyze_source(other, out_dir, opts, cache_name="features_compare.pt", tag="b_"))
    record = {"options": asdict(opts), "runs": [r for r, _ in runs]}
    (out_dir / "analysis.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    figures = out_dir / "figures"  # the report's pictures also as files, for papers and slides
    figures.mkdir(exist_ok=True)
    for _, pics in runs:
        for name, png in pics.items():
            (figures / f"{name}.png").write_bytes(png)
    return write_report(out_dir / "report.html", record, [p for _, p in runs])
