"""Tests of metassl.eval: feature extraction, weighted kNN, linear probe with val-based selection."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from metassl.eval import (
    KNN_PRESETS,
    LinearProbeResult,
    extract_features,
    knn_accuracy,
    knn_predict,
    knn_scores,
    linear_probe,
    stratified_split,
)

# ----------------------------------------------------------------------------------------- kNN


def _hand_knn(bank, bank_y, queries, num_classes, k, t):
    """Reference by explicit loops: cosine sims, top-k, vote exp(sim / t), argmax (first max)."""

    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    bank = [unit(b) for b in bank]
    preds, probs = [], []
    for q in queries:
        q = unit(q)
        sims = [(sum(a * b for a, b in zip(q, b_)), i) for i, b_ in enumerate(bank)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, i in sims[: min(k, len(bank))]:
            votes[bank_y[i]] += math.exp(sim / t)
        best = max(range(num_classes), key=lambda c: (votes[c], -c))
        preds.append(best)
        probs.append([v / sum(votes) for v in votes])
    return preds, probs


def test_knn_matches_hand_computation():
    bank = [[1.0, 0.0, 0.2], [0.9, 0.3, 0.0], [0.0, 1.0, 0.1], [0.1, 0.8, 0.5], [0.0, 0.1, 1.0], [-0.5, 0.2, 0.9],
            [0.7, 0.7, 0.0]]
    bank_y = [0, 0, 1, 1, 2, 2, 1]
    queries = [[1.0, 0.1, 0.0], [0.2, 1.0, 0.3], [0.1, 0.0, 1.0], [0.6, 0.5, 0.4], [-1.0, 0.3, 0.2]]
    for k, t in [(1, 0.1), (3, 0.5), (4, 0.07), (7, 1.0)]:
        ref_pred, ref_prob = _hand_knn(bank, bank_y, queries, 3, k, t)
        args = (torch.tensor(bank), torch.tensor(bank_y), torch.tensor(queries), 3)
        assert knn_predict(*args, k=k, t=t).tolist() == ref_pred
        torch.testing.assert_close(knn_scores(*args, k=k, t=t), torch.tensor(ref_prob), rtol=1e-5, atol=1e-6)
        acc = knn_accuracy(args[0], args[1], args[2], torch.tensor(ref_pred), 3, k=k, t=t)
        assert acc == 1.0


def test_knn_weighting_by_exp_sim_over_t_matters():
    # One very close neighbour of class 0, two farther ones of class 1: a plain majority of the
    # k=3 votes says 1, the exp(sim / t) weighting at small t says 0.
    bank = torch.tensor([[1.0, 0.05], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    bank_y = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, bank_y, query, 2, k=3, t=0.1).item() == 0
    assert knn_predict(bank, bank_y, query, 2, k=3, t=1000.0).item() == 1  # ~uniform weights = majority
    ref_pred, _ = _hand_knn(bank.tolist(), bank_y.tolist(), query.tolist(), 2, 3, 0.1)
    assert ref_pred == [0]
    # Votes are exp(sim/t)-weighted: class-0 share = e^{s0/t} / (e^{s0/t} + 2 e^{0.6/t}).
    s0 = 1.0 / math.sqrt(1 + 0.05**2)
    expected = math.exp(s0 / 0.1) / (math.exp(s0 / 0.1) + 2 * math.exp(0.6 / 0.1))
    assert knn_scores(bank, bank_y, query, 2, k=3, t=0.1)[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_knn_chunking_gives_identical_results():
    g = torch.Generator().manual_seed(0)
    bank, bank_y = torch.randn(503, 32, generator=g), torch.randint(0, 7, (503,), generator=g)
    queries = torch.randn(211, 32, generator=g)
    for distance in ("cosine", "euclidean"):
        ref_p = knn_predict(bank, bank_y, queries, 7, k=20, t=0.07, chunk_size=10_000, distance=distance)
        ref_s = knn_scores(bank, bank_y, queries, 7, k=20, t=0.07, chunk_size=10_000, distance=distance)
        for chunk in (1, 7, 64, None):
            p = knn_predict(bank, bank_y, queries, 7, k=20, t=0.07, chunk_size=chunk, distance=distance)
            assert torch.equal(p, ref_p)
            s = knn_scores(bank, bank_y, queries, 7, k=20, t=0.07, chunk_size=chunk, distance=distance)
            torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-6)
        assert torch.equal(ref_s.argmax(1), ref_p)


def test_knn_k_larger_than_bank_is_clamped_without_warning():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    bank_y = torch.tensor([0, 1, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = knn_scores(bank, bank_y, queries, 3, k=200, t=0.1)
    torch.testing.assert_close(big, knn_scores(bank, bank_y, queries, 3, k=5, t=0.1))
    with pytest.raises(ValueError):
        knn_predict(bank, bank_y, queries, 3, k=0)
    with pytest.raises(ValueError):
        knn_predict(bank, bank_y, queries, 2)  # label 2 outside [0, 2)


def test_knn_small_temperature_does_not_overflow():
    # exp(1 / 0.001) overflows float32; the vote must still be finite and correct.
    bank = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    bank_y = torch.tensor([1, 0, 0])
    scores = knn_scores(bank, bank_y, torch.tensor([[1.0, 0.01]]), 2, k=3, t=0.001)
    assert torch.isfinite(scores).all()
    assert scores.argmax(1).item() == 1


def test_knn_euclidean_variant_matches_solo_learn_rule():
    # Raw (un-normalised) features, weight 1 / (d + 1e-5), temperature unused.  Scale matters here,
    # so cosine and euclidean disagree: the query is collinear with the far class-1 point.
    bank = torch.tensor([[10.0, 0.0], [1.0, 0.6], [1.1, -0.7]])
    bank_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    d = torch.cdist(query, bank)[0]
    w = 1 / (d + 1e-5)
    expected = torch.tensor([[w[1] + w[2], w[0]]]) / w.sum()
    got = knn_scores(bank, bank_y, query, 2, k=3, t=123.0, distance="euclidean")
    torch.testing.assert_close(got, expected)
    assert knn_predict(bank, bank_y, query, 2, k=1, distance="euclidean").item() == 0
    assert knn_predict(bank, bank_y, query, 2, k=1, distance="cosine").item() == 1


def test_knn_presets_table():
    assert KNN_PRESETS == {"k200_t0.1": (200, 0.1), "k20_t0.07": (20, 0.07), "k5_t1.0": (5, 1.0)}
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (300,), generator=g)
    x = centers[y] + torch.randn(300, 16, generator=g)
    for k, t in KNN_PRESETS.values():
        acc = knn_accuracy(x[:250], y[:250], x[250:], y[250:], 4, k=k, t=t)
        assert 0.9 <= acc <= 1.0


# ------------------------------------------------------------------------------ split and probe


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 40, 7, 1])])[torch.randperm(148)]
    state = torch.get_rng_state()
    tr, val = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert set(tr.tolist()).isdisjoint(val.tolist())
    assert sorted(tr.tolist() + val.tolist()) == list(range(148))
    counts = [int((labels[val] == c).sum()) for c in range(4)]
    assert counts == [20, 8, 1, 0]  # round(0.2 n_c); a singleton class stays in train
    tr2, val2 = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(val, val2)
    _, val3 = stratified_split(labels, 0.2, seed=4)
    assert not torch.equal(val, val3)
    tr0, val0 = stratified_split(labels, 0.0, seed=0)
    assert val0.numel() == 0 and tr0.numel() == 148
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0)


def _separable(seed, n, num_classes=4, dim=16):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 4
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def test_linear_probe_learns_separable_data_and_is_reproducible():
    x, y = _separable(0, 1000)
    state = torch.get_rng_state()
    res = linear_probe(x[:800], y[:800], x[800:], y[800:], 4, epochs=15, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    assert isinstance(res, LinearProbeResult)
    assert res.test_acc_last >= 0.97 and res.test_acc_best_val >= 0.97 and res.val_acc_best >= 0.97
    assert res.num_train + res.num_val == 800 and res.num_val == 80
    assert len(res.history) == 15 and [h["epoch"] for h in res.history] == list(range(15))
    assert res.history[0]["lr"] == pytest.approx(0.1) and res.history[-1]["lr"] < 0.01  # cosine
    again = linear_probe(x[:800], y[:800], x[800:], y[800:], 4, epochs=15, seed=0)
    assert again.history == res.history and again.best_epoch == res.best_epoch
    adam = linear_probe(x[:800], y[:800], x[800:], y[800:], 4, epochs=5, lr=1e-2, optimizer="adamw", seed=1)
    assert adam.test_acc_last >= 0.95
    no_val = linear_probe(x[:800], y[:800], x[800:], y[800:], 4, val_fraction=0.0, epochs=3)
    assert no_val.best_epoch == 2 and no_val.test_acc_best_val == no_val.test_acc_last
    assert math.isnan(no_val.val_acc_best) and no_val.num_train == 800


def _val_test_disagree(seed=0, n=60):
    """2-D data where the validation split and the test set pull in opposite directions.

    Training part: many easy points (+-1, 0) and three hard points (-+0.5, +-1) per class.
    Early SGD follows the class-mean direction ~e1; later it rotates to separate the hard points.
    Validation points (+-1, -+1.5) are right only under the early weights, test points (the hard
    type) only under the late ones; so val accuracy falls from 1 to 0 while test rises from 0 to 1.
    """
    y = torch.arange(2 * n) % 2
    tr, val = stratified_split(y, 0.25, seed)
    s = (2 * y - 1).float()
    x = torch.stack([s, torch.zeros_like(s)], 1)
    hard = torch.cat([tr[y[tr] == c][:3] for c in (0, 1)])
    x[hard] = torch.stack([-0.5 * s[hard], s[hard]], 1)
    x[val] = torch.stack([s[val], -1.5 * s[val]], 1)
    yt = torch.arange(200) % 2
    st = (2 * yt - 1).float()
    return x, y, torch.stack([-0.5 * st, st], 1), yt


def test_linear_probe_selects_on_validation_never_on_test():
    x, y, xt, yt = _val_test_disagree()
    kw = dict(val_fraction=0.25, epochs=30, lr=0.1, batch_size=16, seed=0, standardize=False)
    res = linear_probe(x, y, xt, yt, 2, **kw)
    hist = res.history
    # The selected epoch is the val-best one (highest val acc, then lowest val loss, then earliest).
    expected = min(range(len(hist)), key=lambda e: (-hist[e]["val_acc"], hist[e]["val_loss"], e))
    assert res.best_epoch == expected
    assert res.val_acc_best == max(h["val_acc"] for h in hist) == hist[res.best_epoch]["val_acc"]
    assert res.val_acc_last == hist[-1]["val_acc"]
    # Test accuracy reported for "best" is that of the val-selected epoch's weights, and "last" the last.
    assert res.test_acc_best_val == hist[res.best_epoch]["test_acc"]
    assert res.test_acc_last == hist[-1]["test_acc"]
    # The construction makes val and test disagree: test-selection would have picked another epoch.
    assert res.best_epoch < kw["epochs"] - 1
    assert res.val_acc_best == 1.0 and res.val_acc_last <= 0.1
    assert res.test_acc_best_val <= 0.1 and res.test_acc_last >= 0.9
    assert res.test_acc_max_over_epochs >= 0.9
    # The test set cannot influence selection: untracked, or with other test labels, same choice.
    untracked = linear_probe(x, y, xt, yt, 2, track_test=False, **kw)
    assert untracked.best_epoch == res.best_epoch and untracked.test_acc_best_val == res.test_acc_best_val
    assert "test_acc" not in untracked.history[0] and math.isnan(untracked.test_acc_max_over_epochs)
    flipped = linear_probe(x, y, xt, 1 - yt, 2, **kw)
    assert flipped.best_epoch == res.best_epoch
    assert [h["val_acc"] for h in flipped.history] == [h["val_acc"] for h in hist]
    assert flipped.test_acc_best_val == pytest.approx(1.0 - res.test_acc_best_val)


# ---------------------------------------------------------------------------- feature extraction


class _Backbone(nn.Module):
    """Conv + BN + dropout + pooling; output (B, C, 1, 1) so flattening is exercised."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.frozen_bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.drop(self.frozen_bn(self.bn(self.conv(x)))))


class _Mask(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-2, 2, dim))
        self.drop = nn.Dropout(0.5)

    def forward(self, h):  # sees the raw backbone output (B, C, 1, 1)
        return self.drop(h * torch.sigmoid(self.logits)[None, :, None, None])


def _loader(n=10, batch=4, with_index=False):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3
    batches = []
    for s in range(0, n, batch):
        b = (x[s : s + batch], y[s : s + batch])
        batches.append(b + (torch.arange(s, min(s + batch, n)),) if with_index else b)
    return x, y, batches


def test_extract_features_eval_mode_transform_and_restored_flags():
    torch.manual_seed(0)
    net, mask = _Backbone(), _Mask(6)
    net(torch.randn(16, 3, 8, 8))  # give BN non-trivial running statistics
    net.train()
    net.frozen_bn.eval()  # a deliberately frozen submodule must stay frozen
    mask.train()
    x, y, batches = _loader(with_index=True)
    feats, labels = extract_features(net, batches, mask)
    assert feats.dtype == torch.float32 and feats.shape == (10, 6)
    assert labels.dtype == torch.long and torch.equal(labels, y)
    assert net.training and not net.frozen_bn.training and net.bn.training and net.drop.training
    assert mask.training and mask.drop.training
    # Equal to a manual eval-mode, no-dropout forward followed by the mask.
    net.eval(), mask.eval()
    with torch.no_grad():
        ref = mask(net(x)).flatten(1)
    torch.testing.assert_close(feats, ref)
    net.train()
    # A plain callable as transform, L2 normalisation, and (x, y) batches.
    feats2, _ = extract_features(net, _loader()[2], lambda h: 2 * h, normalize=True)
    torch.testing.assert_close(feats2, torch.nn.functional.normalize(net.eval()(x).detach().flatten(1), dim=1))
    net.train()
    feats3, _ = extract_features(net, _loader()[2])
    torch.testing.assert_close(feats3, ref / torch.sigmoid(mask.logits.detach()))
    assert net.training


def test_extract_features_restores_flags_on_error_and_autocast():
    net = _Backbone().train()

    def bad_transform(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        extract_features(net, _loader()[2], bad_transform)
    assert net.training and net.bn.training
    feats, _ = extract_features(net, _loader()[2], autocast_dtype=torch.bfloat16)
    assert feats.dtype == torch.float32 and feats.shape == (10, 6)
    with pytest.raises(TypeError):
        extract_features(net, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError):
        extract_features(net, [])


def test_eval_package_imports_only_itself_and_model_helpers():
    root = Path(__import__("metassl.eval").eval.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["metassl.eval"]
            for name in names:
                assert not name.startswith(("lightning", "pytorch_lightning")), (path.name, name)
                # of metassl: itself, and the torch-only model helpers (feature-map contract, CIFAR stem)
                allowed = ("metassl.eval", "metassl.models.feature_maps", "metassl.models.backbones")
                assert not name.startswith("metassl") or name.startswith(allowed), (path.name, name)
