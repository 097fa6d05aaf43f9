"""metassl.analysis on synthetic features with known answers: redundancy statistics, RankMe,
alignment/uniformity, the exact dimension-removal kNN and ridge probe, background dependence,
the embedding subsample, and the per-epoch label-free metrics of the training loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metassl.analysis import ablation, redundancy
from metassl.analysis.background import background_dependence, background_sensitivity
from metassl.analysis.embedding import embed_2d, stratified_subsample
from metassl.analysis.features import per_dimension_gate
from metassl.engine.evaluation import label_free_metrics
from metassl.eval.knn import knn_accuracy
from metassl.regularizers.metamask import AppliedMask

pytestmark = pytest.mark.usefixtures("one_thread")


def whitened(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n × d`` float64 data with zero mean and exactly identity covariance (population)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # orthonormal columns orthogonal to the constant column: zero mean, covariance I
    q, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=torch.float64), x], 1))
    return q[:, 1:] * math.sqrt(n)


# -- redundancy ------------------------------------------------------------------------------


def test_identity_covariance_has_full_effective_rank_and_no_off_diagonal_energy():
    x = whitened(400, 16)
    assert torch.allclose(x.T @ x / 400, torch.eye(16, dtype=torch.float64), atol=1e-10)
    corr = redundancy.correlation_matrix(x)
    assert redundancy.off_diagonal_energy(corr) == pytest.approx(0.0, abs=1e-20)
    s = redundancy.singular_spectrum(x)
    assert redundancy.effective_rank(s) == pytest.approx(16.0, rel=1e-10)
    assert redundancy.explained_variance_rank(s, 0.99) == 16
    assert redundancy.redundant_pairs(corr)["pairs"] == 0


def test_duplicated_dimensions_have_known_redundancy():
    base = whitened(300, 8)
    x = torch.cat([base, 3.0 * base], 1)  # every dimension has exactly one copy (scaled)
    corr = redundancy.correlation_matrix(x)
    # each of the 16 rows has one off-diagonal 1: sum 16 over 16 * 15 entries
    assert redundancy.off_diagonal_energy(corr) == pytest.approx(16 / (16 * 15), rel=1e-10)
    pairs = redundancy.redundant_pairs(corr, 0.9)
    assert pairs["pairs"] == 8 and pairs["fraction_with_partner"] == 1.0
    s = redundancy.singular_spectrum(x)
    assert redundancy.explained_variance_rank(s, 0.999) == 8
    assert redundancy.effective_rank(s) == pytest.approx(8.0, rel=1e-8)


def test_collapsed_subspace_has_the_subspace_dimension_as_effective_rank():
    k, d = 5, 32
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x = whitened(500, k) @ basis.T + 0.7  # isotropic in a 5-d subspace of 32-d, shifted
    s = redundancy.singular_spectrum(x)
    assert redundancy.effective_rank(s) == pytest.approx(k, rel=1e-8)
    assert redundancy.explained_variance_rank(s, 0.99) == k


def test_rankme_against_a_hand_computation():
    z = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    eps = 1e-7
    p = [3 / 6 + eps, 2 / 6 + eps, 1 / 6 + eps]
    expected = math.exp(-sum(v * math.log(v) for v in p))
    assert redundancy.rankme(z) == pytest.approx(expected, rel=1e-12)
    # rank-deficient: the zero singular values still count eps (Garrido et al. 2023, Eq. 1)
    z2 = torch.zeros(4, 4, dtype=torch.float64)
    z2[0, 0] = z2[1, 1] = 1.0
    p2 = [0.5 + eps, 0.5 + eps, eps, eps]
    assert redundancy.rankme(z2) == pytest.approx(math.exp(-sum(v * math.log(v) for v in p2)), rel=1e-12)
    assert redundancy.rankme(torch.zeros(3, 3)) == 0.0


def test_correlation_matches_torch_and_constant_dimension_is_dead():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[:, 3] = 5.0
    corr = redundancy.correlation_matrix(x)
    live = [0, 1, 2, 4, 5]
    assert torch.allclose(corr[live][:, live], torch.corrcoef(x[:, live].T), atol=1e-12)
    assert corr[3].abs().max() == 0 and corr[:, 3].abs().max() == 0
    stats = redundancy.dimension_stats(x)
    assert stats["dead"].tolist() == [False, False, False, True, False, False]
    assert stats["dead_fraction"] == pytest.approx(1 / 6)
    assert torch.allclose(stats["mean"], x.mean(0)) and torch.allclose(stats["std"], x.std(0, unbiased=False))


def test_alignment_and_uniformity_against_hand_computations():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert redundancy.alignment(z1, z2) == pytest.approx(1.0)  # ‖e1 − e2‖² = 2 and 0
    assert redundancy.alignment(z1, z2, alpha=1.0) == pytest.approx(math.sqrt(2) / 2)
    pts = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])  # 0°, 90°, 180° on the circle
    expected = math.log((2 * math.exp(-2 * 2) + math.exp(-2 * 4)) / 3)  # squared distances 2, 2, 4
    assert redundancy.uniformity(pts) == pytest.approx(expected, rel=1e-6)
    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(3))
    assert redundancy.uniformity(x, chunk=4) == pytest.approx(redundancy.uniformity(x, chunk=1000), rel=1e-5)


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="flatten"):
        redundancy.correlation_matrix(torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        redundancy.alignment(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="positive integer"):
        ablation.dimension_groups(16, 0)
    with pytest.raises(ValueError, match="below 16"):
        ablation.dimension_groups(16, 16)
    with pytest.raises(ValueError, match="same D"):
        ablation.knn_removal(torch.zeros(5, 4), torch.zeros(5), torch.zeros(3, 3), torch.zeros(3), 2, 1)


# -- dimension removal ---------------------------------------------------------------------


def _clusters(n: int, d: int, classes: int, seed: int, informative: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, informative, generator=torch.Generator().manual_seed(99), dtype=dtype) * 2
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[:, :informative] += centres[y]
    return x, y


def _brute_force(bank, by, query, qy, classes, groups, k, t):
    out = []
    for g in groups:
        b, q = bank.clone(), query.clone()
        b[:, g] = 0
        q[:, g] = 0
        out.append(knn_accuracy(b, by, q, qy, classes, k=k, t=t))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("rows_per_block,chunk", [(None, 1 << 24), (1, 1 << 24), (7, 2000)])
def test_knn_removal_equals_brute_force(rows_per_block, chunk):
    bank, by = _clusters(400, 22, 4, seed=0)
    query, qy = _clusters(150, 22, 4, seed=1)
    bank[7] = 0.0
    bank[7, 9] = 4.0  # this bank row vanishes when its group (8..11) is removed
    bank[11, 20:] = 50.0  # most of this row's norm sits in the last, shorter group
    query[3] = 0.0
    query[3, 1] = 2.0  # this query vanishes when its group (0..3) is removed: 0 against every bank row
    result = ablation.knn_removal(bank, by, query, qy, 4, 4, k=15, t=0.1, dtype=torch.float64,
                                  rows_per_block=rows_per_block, chunk_elements=chunk)
    expected = _brute_force(bank, by, query, qy, 4, result.groups, 15, 0.1)
    assert [g.tolist() for g in result.groups][-1] == [20, 21]
    assert torch.allclose(result.accuracies, expected, atol=1e-6)
    assert result.base_accuracy == pytest.approx(knn_accuracy(bank, by, query, qy, 4, k=15, t=0.1), abs=1e-6)
    assert int((result.fixed - result.broken).sum()) == round(float(result.gains.sum()) * 150)


def test_knn_removal_equals_brute_force_on_nonnegative_clustered_features():
    """Post-ReLU-like features (all similarities high and close together): removals reorder many
    neighbours, so many entries pass the floor; still the brute-force result."""
    bank, by = _clusters(300, 16, 3, seed=2)
    query, qy = _clusters(80, 16, 3, seed=3)
    bank, query = bank.abs() + 3.0, query.abs() + 3.0
    result = ablation.knn_removal(bank, by, query, qy, 3, 2, k=25, t=0.05, dtype=torch.float64, rows_per_block=16)
    assert torch.allclose(result.accuracies, _brute_force(bank, by, query, qy, 3, result.groups, 25, 0.05), atol=1e-6)


def test_knn_removal_float32_and_k_above_bank():
    bank, by = _clusters(60, 10, 3, seed=4, dtype=torch.float32)
    query, qy = _clusters(40, 10, 3, seed=5, dtype=torch.float32)
    result = ablation.knn_removal(bank, by, query, qy, 3, 1, k=100, t=0.5)  # k > bank: every row votes
    expected = _brute_force(bank, by, query, qy, 3, result.groups, 100, 0.5)
    assert torch.allclose(result.accuracies, expected, atol=1e-6)


def test_ablation_finds_a_planted_confounder_dimension():
    """Dimension 9 encodes a nuisance variable that is tied to the class in the bank (80%) but
    not in the test split (a background-like confounder): removing it must raise kNN accuracy,
    rank first and be significant, while removing a class dimension lowers the accuracy."""
    bank, by = _clusters(600, 12, 5, seed=6, informative=4)
    query, qy = _clusters(400, 12, 5, seed=7, informative=4)
    g = torch.Generator().manual_seed(8)
    tied = torch.rand(600, generator=g) < 0.8
    nuisance_bank = torch.where(tied, by, torch.randint(0, 5, (600,), generator=g))
    nuisance_query = torch.randint(0, 5, (400,), generator=g)
    bank[:, 9] = 3.0 * nuisance_bank.double()
    query[:, 9] = 3.0 * nuisance_query.double()
    result = ablation.knn_removal(bank, by, query, qy, 5, 1, k=20, t=0.1)
    rows = result.rows()
    assert rows[0]["dims"] == [9] and rows[0]["gain"] > 0.1 and rows[0]["significant"]
    assert rows[-1]["dims"][0] < 4 and rows[-1]["gain"] < 0  # the most needed dimension carries the class
    assert not any(r["significant"] for r in rows[1:] if r["dims"][0] >= 4)


def _ridge_brute(train_x, train_y, test_x, test_y, classes, keep, lam):
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False)
    xt, xs = ((train_x - mean) / std)[:, keep], ((test_x - mean) / std)[:, keep]
    onehot = F.one_hot(train_y, classes).double()
    w = torch.linalg.solve(xt.T @ xt / xt.shape[0] + lam * torch.eye(len(keep), dtype=torch.float64),
                           xt.T @ (onehot - onehot.mean(0)) / xt.shape[0])
    return float(((xs @ w + onehot.mean(0)).argmax(1) == test_y).double().mean())


def test_ridge_removal_equals_refitting_without_the_group():
    train_x, train_y = _clusters(300, 10, 4, seed=9)
    test_x, test_y = _clusters(200, 10, 4, seed=10)
    result, lam = ablation.ridge_removal(train_x, train_y, test_x, test_y, 4, 3, lambdas=(1e-2,))
    assert lam == 1e-2
    assert result.base_accuracy == pytest.approx(_ridge_brute(train_x, train_y, test_x, test_y, 4, list(range(10)), lam))
    for i, g in enumerate(result.groups):
        keep = [d for d in range(10) if d not in g.tolist()]
        assert float(result.accuracies[i]) == pytest.approx(_ridge_brute(train_x, train_y, test_x, test_y, 4, keep, lam))


def test_mcnemar_and_rank_correlation_against_hand_values():
    assert ablation.mcnemar_p(0, 5) == pytest.approx(2 * 0.5**5)
    assert ablation.mcnemar_p(3, 3) == 1.0 and ablation.mcnemar_p(0, 0) == 1.0
    assert ablation.mcnemar_p(10, 2) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2**12)
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert ablation.rank_correlation(a, b) == pytest.approx(0.8)  # 1 − 6 Σd² / (n (n² − 1))
    ties = ablation.rank_correlation(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert ties == pytest.approx(math.sqrt(3) / 2)  # ranks (1.5, 1.5, 3) vs (1, 2, 3)
    assert ablation.rank_correlation(torch.ones(4), a) is None


def test_per_dimension_gate_is_found_only_for_diagonal_transforms():
    mask = torch.tensor([0.2, 0.9, 0.5])
    assert torch.allclose(per_dimension_gate(AppliedMask(mask), 3), mask)
    mixing = nn.Linear(3, 3, bias=False)
    assert per_dimension_gate(mixing, 3) is None
    shift = nn.Linear(3, 3)
    with torch.no_grad():
        shift.weight.copy_(torch.eye(3))
        shift.bias.fill_(0.1)
    assert per_dimension_gate(shift, 3) is None
    assert per_dimension_gate(None, 3) is None


# -- background, embedding -------------------------------------------------------------------


def test_background_dependence_on_features_with_background_dimensions():
    bank, by = _clusters(300, 8, 3, seed=11, informative=2)
    test, ty = _clusters(150, 8, 3, seed=12, informative=2)
    families = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(13))
    test_families = torch.randint(0, 4, (150,), generator=torch.Generator().manual_seed(14))
    bank[:, 4:] = 5.0 * F.one_hot(families, 4).double()  # dimensions 4..7 encode the background
    test[:, 4:] = 5.0 * F.one_hot(test_families, 4).double()
    fg = test.clone()
    fg[:, 4:] = 0.0  # background removed
    report = background_dependence(bank, by, test, ty, fg, 3, k=10, t=0.1, bank_backgrounds=families,
                                   test_backgrounds=test_families)
    assert report["knn_full"] == pytest.approx(knn_accuracy(bank, by, test, ty, 3, k=10, t=0.1))
    assert report["knn_foreground"] == pytest.approx(knn_accuracy(bank, by, fg, ty, 3, k=10, t=0.1))
    assert report["gap"] == pytest.approx(report["knn_full"] - report["knn_foreground"])
    assert report["background_knn"] > 0.9 > report["background_chance"]
    sensitivity = background_sensitivity(test, fg)
    assert float(sensitivity[:4].abs().max()) == 0.0 and bool((sensitivity[4:] > 0).all())
    col = test[:, 4]
    assert float(sensitivity[4]) == pytest.approx(float(col.abs().mean() / col.std(unbiased=False)))


def test_stratified_subsample_keeps_class_proportions_and_embedding_shapes():
    labels = torch.cat([torch.zeros(600), torch.ones(300), torch.full((100,), 2.0)]).long()
    idx = stratified_subsample(labels, 100, seed=0)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert all(abs(c - e) <= 1 for c, e in zip(counts, [60, 30, 10]))
    assert torch.equal(stratified_subsample(labels[:50], 100), torch.arange(50))
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    assert embed_2d(x, "pca").shape == (30, 2)
    with pytest.raises(ValueError, match="tsne, umap or pca"):
        embed_2d(x, "isomap")


def test_tsne_embedding_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn", reason="scikit-learn is optional (pip install scikit-learn)")
    x, _ = _clusters(60, 8, 3, seed=15, dtype=torch.float32)
    coords = embed_2d(x, "tsne", seed=0)
    assert coords.shape == (60, 2) and bool(torch.isfinite(coords).all())


# -- per-epoch label-free metrics ------------------------------------------------------------


class _TwoViews(torch.utils.data.Dataset):
    """Items ``([view1, view2], label)``: the second view adds seeded noise to the first."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return [x, x + 0.1 * torch.randn(x.shape)], 0


def test_label_free_metrics_match_the_metric_functions_and_leave_the_rng_alone():
    feats = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    images = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    identity = lambda x: x  # noqa: E731
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    out = label_free_metrics(feats, identity, _TwoViews(images), seed=7, pairs=12)
    assert torch.equal(torch.rand(1), before)  # training's random stream untouched
    assert out["val/rankme"] == pytest.approx(redundancy.rankme(feats))
    assert out["val/uniformity"] == pytest.approx(redundancy.uniformity(feats))
    torch.manual_seed(7)
    noise = [0.1 * torch.randn(6) for _ in range(12)]
    second = images[:12] + torch.stack(noise)
    assert out["val/alignment"] == pytest.approx(redundancy.alignment(images[:12], second), rel=1e-6)
    assert set(label_free_metrics(feats)) == {"val/rankme", "val/uniformity"}


def test_auto_extraction_precision_follows_the_training_rule(monkeypatch):
    from metassl.analysis import features
    from metassl.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert features.resolve_extraction_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert features.resolve_extraction_precision("auto", "cpu") == "fp32"
    assert features.resolve_extraction_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        features.resolve_extraction_precision("fp16", "cpu")
