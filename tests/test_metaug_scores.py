"""MetAug's score sets (real and generated InfoNCE terms, margins) and the encoder objective, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metassl.engine.step import encoder_objective
from metassl.losses import moco_infonce, nt_xent

from metaug_helpers import DT, make, views_for

pytestmark = pytest.mark.usefixtures("one_thread")


def generated(reg, q):
    """G_v(q_v) with the generators as modules (an independent path from the functional one)."""
    return torch.stack([gen(q[v]) for v, gen in enumerate(reg.generators)])


# -- the score sets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_real_unified_loss_is_the_base_infonce(method):
    """gamma = null (2 / temperature), loss_scale 1, no delta: L_U(real) equals the base loss."""
    m, reg = make(method, DT)
    out = m(views_for(DT))
    meta = reg.named_meta_parameters()
    terms, _ = reg.terms(m, out, meta)
    z = out["z"]
    if method == "simclr":
        expected = nt_xent(z[0], z[1], 0.5)
    else:
        expected = (moco_infonce(z[0], out["z_target"][1], m.queue, 0.2) + moco_infonce(z[1], out["z_target"][0], m.queue, 0.2)) / 2
    torch.testing.assert_close(terms["base"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["base"], m.loss(out), rtol=1e-12, atol=1e-12)
    reg.gamma_in_use = 16.0  # any other gamma is no longer the base loss
    assert not torch.allclose(reg.terms(m, out, meta)[0]["base"], expected)


def infonce_rows(q, pos, negs, tau, normalize_negs=True):
    """-log(e^{q.p/t} / (e^{q.p/t} + sum_k e^{q.k/t})) of one row, L2-normalised inputs (the
    MoCo queue is used as stored, as MoCo does)."""
    q, pos = F.normalize(q, dim=0), F.normalize(pos, dim=0)
    negs = F.normalize(negs, dim=1) if normalize_negs else negs
    logits = torch.cat([(q @ pos)[None], negs @ q]) / tau
    return -torch.log_softmax(logits, 0)[0]


def gen_term_by_hand(per_view_rows, weight):
    """w_gen (sum_v L_U(G_v) + L_U(G_all)), rows of view v in per_view_rows[v]."""
    means = [sum(r) / len(r) for r in per_view_rows]
    return weight * (sum(means) + sum(sum(r) for r in per_view_rows) / sum(len(r) for r in per_view_rows))


def test_simclr_generated_queries_face_the_same_keys():
    """G_v(z_v,i) replaces z_v,i as a query: positive z_u,i, negatives both views of the other
    images, its own real embedding no candidate (hand computation); margins from real scores."""
    m, reg = make("simclr", DT, weight_gen=0.3)
    out = m(views_for(DT))
    terms, scores = reg.terms(m, out, reg.named_meta_parameters())
    z = [F.normalize(t, dim=1) for t in out["z"]]
    g = generated(reg, torch.stack(z))
    n = z[0].shape[0]
    rows = []
    for v in range(2):
        u = 1 - v
        rows.append([infonce_rows(g[v, i], z[u][i], torch.cat([z[0][torch.arange(n) != i], z[1][torch.arange(n) != i]]), 0.5)
                     for i in range(n)])
    torch.testing.assert_close(terms["gen"], gen_term_by_hand(rows, 0.3), rtol=1e-10, atol=1e-12)
    # the cosine scores: generated positives against the other view
    torch.testing.assert_close(scores["gen_pos"][0, :, 0], (F.normalize(g[0], dim=1) * z[1]).sum(1))
    assert scores["mask"].shape == (2, n, 2 * n) and int(scores["mask"][0].sum()) == n * (2 * n - 2)


def test_moco_generated_queries_against_the_queue():
    m, reg = make("moco_v2", DT, weight_gen=0.2, weight_mi=0.0)
    out = m(views_for(DT))
    terms, _ = reg.terms(m, out, reg.named_meta_parameters())
    q = torch.stack([F.normalize(t, dim=1) for t in out["z"]])
    g = generated(reg, q)
    rows = [[infonce_rows(g[v, i], out["z_target"][1 - v][i], m.queue, 0.2, False) for i in range(q.shape[1])] for v in range(2)]
    torch.testing.assert_close(terms["gen"], gen_term_by_hand(rows, 0.2), rtol=1e-10, atol=1e-12)
    assert terms["mi"] == 0


@pytest.mark.parametrize("method", ["byol", "simsiam", "barlow_twins"])
def test_non_contrastive_bases_keep_their_loss_and_add_an_in_batch_term(method):
    """Base: the method's own loss.  Generated queries (from the prediction where there is one)
    against the other view's detached targets of the batch, gamma = 16 (tau = 1/8)."""
    m, reg = make(method, DT, weight_gen=0.5)
    out = m(views_for(DT))
    terms, _ = reg.terms(m, out, reg.named_meta_parameters())
    torch.testing.assert_close(terms["base"], m.loss(out))
    queries = out["p"] if "p" in out else out["z"]
    targets = out["z_target"] if "z_target" in out else out["z"]
    g = generated(reg, torch.stack([F.normalize(t, dim=1) for t in queries]))
    n = g.shape[1]
    rows = [[infonce_rows(g[v, i], targets[1 - v][i], targets[1 - v][torch.arange(n) != i], 2 / 16) for i in range(n)] for v in range(2)]
    torch.testing.assert_close(terms["gen"], gen_term_by_hand(rows, 0.5), rtol=1e-10, atol=1e-12)


def test_margin_injection_and_delta_margin_options():
    m, reg = make("simclr", DT, weight_gen=1e-3, weight_mi=2.0, margin_pos_weight=0.5, delta_margin=0.25, margin_type="mean")
    out = m(views_for(DT))
    terms, s = reg.terms(m, out, reg.named_meta_parameters())
    from metassl.losses.unified import margin_injection_loss, unified_contrastive_loss

    mi = margin_injection_loss(s["gen_pos"], s["gen_neg"], s["real_pos"], s["real_neg"], "mean", 0.5, neg_mask=s["mask"])
    torch.testing.assert_close(terms["mi"], 2.0 * mi)
    base = unified_contrastive_loss(s["real_pos"], s["real_neg"], 4.0, 0.25, neg_mask=s["mask"], scale=1.0)
    torch.testing.assert_close(terms["base"], base)
    assert not torch.allclose(terms["base"], m.loss(out))


# -- the encoder objective -------------------------------------------------------------------------------
def test_encoder_step_freezes_the_generators_but_trains_through_them():
    m, reg = make("simclr", weight_gen=0.5)
    views = views_for()
    loss, _, _ = encoder_objective(m, reg, views)
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in reg.meta_parameters())
    with_gen = m.projector[0].weight.grad.clone()
    m.zero_grad()
    encoder_objective(m, reg, views)[1]["base"].backward()
    assert not torch.allclose(with_gen, m.projector[0].weight.grad)  # the generated term reached the encoder
