"""ICL-MSR (metassl.regularizers.iclmsr) construction and runs: configuration and bad options, smoke runs on
the built-in data, evaluation, checkpoints, bf16 (terms: test_iclmsr_terms.py; ψ's meta-gradient:
test_iclmsr_meta_gradient.py)."""

from __future__ import annotations

import json

import pytest
import torch

from metassl.cli import main
from metassl.config import load_config
from metassl.engine.step import training_step
from metassl.errors import MetasslError
from metassl.methods import METHODS
from metassl.regularizers import REGULARIZERS, StepContext, build_regularizer
from metassl.regularizers.base import regularizer_hparams
from metassl.regularizers.iclmsr import ICLMSR, FrozenIntervention

from iclmsr_helpers import DT, FEAT, batch, encoder_opt, make, tiny_method

pytestmark = pytest.mark.usefixtures("one_thread")


# -- configuration and bad input -----------------------------------------------------------------
def test_registry_preset_and_defaults():
    assert REGULARIZERS["iclmsr"] is ICLMSR and ICLMSR.data_requirements == ("clean",)
    cfg = load_config(["regularizer=iclmsr"])
    assert {k: v for k, v in cfg.regularizer.items() if k != "name"} == regularizer_hparams("iclmsr")
    _, reg = make()
    assert reg.bilevel and reg.weight_base == 1.0 and 0.1 <= reg.weight_do <= 0.5
    assert torch.equal(reg.semantic(torch.randn(3, 3, 6, 6)), torch.ones(3, FEAT))  # w = 1 at init
    meta = {id(p) for p in reg.meta_parameters()}
    assert meta == {id(p) for p in reg.semantic.parameters()}
    assert not meta & {id(p) for p in reg.encoder_parameters()}
    assert {id(p) for p in reg.encoder_parameters()} == {id(p) for p in reg.adjustment.parameters()}


def test_every_preset_key_has_a_comment():
    from pathlib import Path

    import metassl.configs

    lines = (Path(metassl.configs.__file__).parent / "regularizer" / "iclmsr.yaml").read_text().splitlines()
    keys = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith("name:")]
    assert len(keys) == len(regularizer_hparams("iclmsr"))
    assert all("#" in ln for ln in keys)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(adjustment=False, semantic_regularizer=False), "regularizer=none"),
        (dict(dictionary="kmeans"), "dictionary must be one of ema, learned"),
        (dict(prior="posterior"), "prior must be one of"),
        (dict(attention="cosine"), "attention must be one of dot, none"),
        (dict(num_prototypes=0), "num_prototypes must be a positive integer"),
        (dict(dictionary_momentum=1.0), "dictionary_momentum"),
        (dict(dead_threshold=1.5), "dead_threshold"),
        (dict(weight_do=-1.0), "weight_do"),
        (dict(dictionary="learned", attention="none"), "prior=uniform"),
        (dict(grad_mode="exact"), "grad_mode must be one of"),
        (dict(meta_objective="semantic"), "meta_objective must be one of auto, plain, weighted"),
        (dict(meta_objective="plain", grad_mode="first_order"), "identically zero"),
        (dict(order="after"), "order must be one of reuse, official"),
        (dict(backbone_tangent="exact"), "backbone_tangent must be one of difference, jvp"),
        (dict(tangent_radius=0.0), "tangent_radius must be positive"),
    ],
)
def test_bad_options_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        ICLMSR(**kw)
    assert len(str(err.value).splitlines()) == 1


def test_bad_batches_one_line():
    m, reg = make()
    opt = encoder_opt(m, reg)
    views, extras = batch()
    with pytest.raises(MetasslError, match="extras\\['clean'\\]") as err:
        training_step(m, reg, views, None, opt)
    assert len(str(err.value).splitlines()) == 1
    for bad in (extras["clean"][:3], extras["clean"][:, :1], extras["clean"][0]):
        with pytest.raises(ValueError, match="must be a \\(B, 3, H, W\\) tensor") as err:
            training_step(m, reg, views, None, opt, extras={"clean": bad})
        assert len(str(err.value).splitlines()) == 1
    m, reg = make("moco_v2")
    m.shuffle_bn = True
    ctx = StepContext(method=m, views=views, extras=extras, distributed=True)
    with pytest.raises(MetasslError, match="shuffle_bn=false"):
        reg.prepare_views(views, ctx)
    with pytest.raises(ValueError, match="has no parameter"):
        build_regularizer("iclmsr", tiny_method("simclr"), prototypes=3)


# -- training, evaluation, checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_step_smoke_run_on_builtin_data(method, smoke_overrides, tmp_path):
    args = ["train", *smoke_overrides, f"method={method}", "regularizer=iclmsr", "trainer.max_steps=2",
            "regularizer.attention_dim=16", "regularizer.semantic_hidden_dim=8", "eval.knn_init=false",
            "regularizer.eval_intervention=true"]
    if method in ("byol", "simsiam"):
        args.append("method.pred_hidden_dim=32")
    assert main(args) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["regularizer"] == "iclmsr" and 0.0 <= summary["knn_top1"] <= 1.0
    saved = torch.load(out / "confounder_dictionary.pt")
    assert saved["prototypes"].shape == (16, 256) and torch.isfinite(saved["prototypes"]).all()
    assert float(saved["prior"].sum()) == pytest.approx(1.0)
    metrics = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_do" in metrics and "train/meta/grad_norm" in metrics


def test_eval_transform_and_checkpoint_state():
    m, reg = make(dtype=DT)
    assert reg.eval_transform() is None
    reg.eval_intervention = True
    assert reg.eval_transform() is None  # not seeded yet: nothing to intervene with
    views, extras = batch(DT)
    opt = encoder_opt(m, reg)
    training_step(m, reg, views, None, opt, None, extras=extras)
    t = reg.eval_transform()
    assert isinstance(t, FrozenIntervention) and not any(p.requires_grad for p in t.parameters())
    h = torch.randn(5, FEAT, dtype=DT)
    torch.testing.assert_close(t(h), reg.adjust(h).detach())  # weights 1: no clean image at evaluation
    assert t(h).shape == h.shape
    reg.eval_intervention = False
    assert reg.eval_transform() is None  # default: the backbone feature
    state = reg.state_dict()
    assert {"dictionary.prototypes", "dictionary.frequencies", "dictionary.seeded"} <= set(state)
    _, fresh = make(dtype=DT, seed=5)
    fresh.load_state_dict(state)
    assert bool(fresh.dictionary.seeded) and torch.equal(fresh.dictionary.prototypes, reg.dictionary.prototypes)


def test_bf16_autocast_step():
    m, reg = make()
    opt = encoder_opt(m, reg)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    views, extras = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = training_step(m, reg, views, None, opt, meta_opt, extras=extras)
    assert torch.isfinite(logs["loss"]) and logs["meta/grad_norm"] > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in reg.semantic.parameters())
    assert reg.dictionary.prototypes.dtype == torch.float32 and torch.isfinite(reg.dictionary.prototypes).all()


def test_cli_refuses_bad_options_in_one_line(smoke_overrides, capsys):
    code = main(["train", *smoke_overrides, "regularizer=iclmsr", "regularizer.adjustment=false", "regularizer.semantic_regularizer=false"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "regularizer=none" in err and len(err.splitlines()) == 1
