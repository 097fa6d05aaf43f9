"""MetAug (metassl.regularizers.metaug) on tiny networks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from metassl.config import load_config
from metassl.engine.step import training_step
from metassl.methods import METHODS, build_method
from metassl.regularizers import REGULARIZERS, MetAug, build_regularizer
from metassl.regularizers.base import check_regularizer, regularizer_hparams

from metaug_helpers import FEAT, encoder_opt, make, tiny_backbone, views_for

pytestmark = pytest.mark.usefixtures("one_thread")


# -- construction, presets, bad options -------------------------------------------------------------
def test_registry_config_and_paper_preset():
    assert REGULARIZERS["metaug"] is MetAug
    cfg = load_config(["regularizer=metaug"])
    assert {k: v for k, v in cfg.regularizer.items() if k != "name"} == regularizer_hparams("metaug")
    paper = load_config(["paper=metaug_official"])
    assert paper.method.name == "moco_v2" and paper.method.queue_size == 1024 and paper.batch_size == 64
    assert paper.regularizer.gamma == 16.0 and paper.regularizer.loss_scale is None and paper.trainer.max_epochs == 300
    assert paper.optimizer.lr == 0.03 and not paper.optimizer.scale_lr and paper.method.temperature == 2 / paper.regularizer.gamma
    _, reg = make()
    assert len(reg.generators) == 2 and reg.encoder_parameters() == []
    assert set(map(id, reg.meta_parameters())) == {id(p) for g in reg.generators for p in g.parameters()}
    assert reg.gamma_in_use == pytest.approx(2 / 0.5)  # SimCLR's temperature 0.5
    assert make("byol")[1].gamma_in_use == 16.0 and make("moco_v2")[1].gamma_in_use == pytest.approx(10.0)
    assert make("byol")[1].generators[0].mlp[0].in_features == 5  # the predictor's output
    opt, sched = reg.configure_meta_optimizer(10)
    assert isinstance(opt, torch.optim.SGD) and sched is None
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(grad_mode="exact"), "grad_mode"),
        (dict(margin_type="huge"), "margin_type"),
        (dict(schedule="fast"), "schedule must be one of"),
        (dict(schedule="original"), "second encoder optimizer step"),
        (dict(schedule="v2"), "use schedule=v1"),
        (dict(order="before"), "order must be one of reuse, official"),
        (dict(tangent_radius=0.0), "tangent_radius must be positive"),
        (dict(gamma=-1.0), "gamma must be positive"),
        (dict(loss_scale=0.0), "loss_scale"),
        (dict(delta_margin=1.5), "delta_margin"),
        (dict(weight_gen=0.0, weight_mi=0.0), "use regularizer=none"),
        (dict(weight_gen=-1.0), "weight_gen"),
        (dict(generator_num_layers=0), "generator_num_layers"),
        (dict(virtual_lr=0.0), "virtual_lr"),
        (dict(meta_scheduler="step"), "meta_scheduler"),
    ],
)
def test_bad_options_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        MetAug(**kw)
    assert len(str(err.value).splitlines()) == 1


def test_unknown_base_method_refused_in_one_line():
    assert all(MetAug.supports(name) is None for name in METHODS)
    reason = MetAug.supports("dino")
    assert reason and "metaug_scores.py" in reason and len(reason.splitlines()) == 1
    check_regularizer("metaug", "simclr")


# -- every base method, logging, artefacts ------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_steps_with_every_base_method(method):
    m, reg = make(method, weight_gen=0.1, weight_mi=0.1)
    opt = encoder_opt(m, lr=0.05)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    phi0 = parameters_to_vector(reg.meta_parameters()).detach().clone()
    for step in range(2):
        logs = training_step(m, reg, views_for(seed=step), None, opt, meta_opt, global_step=step)
        assert all(math.isfinite(float(v)) for v in logs.values()), logs
        assert float(logs["loss"]) == pytest.approx(float(logs["loss_base"] + logs["loss_gen"] + logs["loss_mi"]), rel=1e-5)
        assert logs["loss_gen"] > 0 and logs["loss_mi"] >= 0 and logs["meta/grad_norm"] > 0
    phi = parameters_to_vector(reg.meta_parameters()).detach()
    assert not torch.equal(phi, phi0) and torch.isfinite(phi).all()


@pytest.mark.parametrize("options", [dict(virtual_step="mirror"), dict(grad_mode="finite_difference", fd_scheme="forward"),
                                     dict(meta_optimizer="adam", meta_scheduler="cosine", virtual_lr=None)])
def test_other_step_rules_and_meta_optimizers_run(options):
    m, reg = make("moco_v2", weight_gen=0.5, **options)
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    phi0 = parameters_to_vector(reg.meta_parameters()).detach().clone()
    logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert torch.isfinite(logs["loss"]) and logs["meta/grad_norm"] > 0
    assert not torch.equal(parameters_to_vector(reg.meta_parameters()).detach(), phi0)


def test_paper_preset_builds():
    """paper=metaug_official's method and regularizer sections as written (small backbone)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config(["paper=metaug_official"]), resolve=True)
    m = build_method("moco_v2", tiny_backbone(), FEAT, **{k: v for k, v in cfg["method"].items() if k != "name"})
    reg = build_regularizer("metaug", m, **{k: v for k, v in cfg["regularizer"].items() if k != "name"})
    assert reg.gamma_in_use == 16.0 and reg.loss_scale is None and reg.generators[0].mlp[0].in_features == 128
    out = m(views_for())
    terms, _ = reg.terms(m, out, reg.named_meta_parameters())
    torch.testing.assert_close(terms["base"], m.loss(out))  # tau = 2 / gamma and 16 / gamma = 1


def test_log_stats_and_similarity_artefacts(tmp_path):
    m, reg = make("simclr")
    assert reg.log_stats() == {}
    reg.on_train_end(tmp_path / "none")  # before any step: nothing to plot
    assert not (tmp_path / "none").exists()
    opt = encoder_opt(m)
    training_step(m, reg, views_for(), None, opt, reg.configure_meta_optimizer(10)[0])
    stats = reg.log_stats()
    assert set(stats) == set(MetAug.STAT_NAMES)
    s = reg.last_scores
    assert stats["sim_real_pos"] == pytest.approx(float(s["real_pos"].mean()))
    assert stats["sim_gen_neg"] == pytest.approx(float(s["gen_neg"][s["mask"]].mean()))
    assert -1 <= stats["sim_gen_to_real"] <= 1 and 0 <= stats["gen_pos_easier_than_real"] <= 1
    reg.on_train_end(tmp_path / "run")
    assert (tmp_path / "run" / "metaug_similarities.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "run" / "metaug_similarities.json").read_text())
    assert report["pairs"] == {"real_pos": 16, "gen_pos": 16, "real_neg": 16 * 14, "gen_neg": 16 * 14}
    assert sum(report["counts"]["gen_neg"]) == 16 * 14 and len(report["bin_edges"]) == 41
    assert report["sim_real_pos"] == pytest.approx(stats["sim_real_pos"])


def test_bf16_autocast_step():
    m, reg = make("simclr", weight_gen=0.5)
    opt = encoder_opt(m)
    meta_opt, _ = reg.configure_meta_optimizer(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = training_step(m, reg, views_for(), None, opt, meta_opt)
    assert torch.isfinite(logs["loss"]) and logs["loss_base"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in reg.meta_parameters())
    assert logs["meta/grad_norm"] > 0


def test_cli_smoke_run_writes_the_similarity_artefacts(tmp_path):
    """`metassl train regularizer=metaug` end to end (2 steps): every term logged, the artefacts written."""
    from metassl.cli import main

    out = tmp_path / "run"
    args = ["train", "protocol=smoke", "regularizer=metaug", f"output_dir={out}", "data.num_train=96", "data.num_test=40",
            "method.proj_hidden_dim=32", "method.proj_output_dim=16", "regularizer.generator_hidden_dim=32",
            "trainer.max_steps=2", "eval.linear_probe=false"]
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["regularizer"] == "metaug"
    header = (out / "metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss_base", "train/loss_gen", "train/loss_mi", "train/meta/grad_norm", "train/reg/sim_gen_pos"):
        assert column in header
    assert (out / "metaug_similarities.png").is_file()
    assert json.loads((out / "metaug_similarities.json").read_text())["pairs"]["gen_pos"] == 2 * 32
