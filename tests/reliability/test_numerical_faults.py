"""NaN/inf loss terms: one line naming the step and the term, exit 2, last good checkpoint kept;
``trainer.skip_nonfinite_steps=N`` skips at most N bad steps (updates not applied)."""

from __future__ import annotations

import json

import pytest
import torch

from metassl.cli import main
from metassl.regularizers.base import Regularizer
from metassl.regularizers.metamask import MetaMask

from reliability_helpers import error_lines, last_step, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)

BAD_STEP = 4  # 96 images / batch 32 = 3 steps per epoch: step 4 is in the second epoch, after a checkpoint


def poison_term(monkeypatch, cls, term: str, steps: set[int], value: float = float("nan")) -> None:
    """Make ``cls.objective`` return ``value`` for ``term`` at the given global steps."""
    original = cls.objective

    def objective(self, out, ctx):
        terms = original(self, out, ctx)
        if ctx.global_step in steps:
            terms[term] = terms[term] * value
        return terms

    monkeypatch.setattr(cls, "objective", objective)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_base_loss_nonfinite_stops_naming_step_and_term(tmp_path, capsys, monkeypatch, value):
    poison_term(monkeypatch, Regularizer, "base", {BAD_STEP}, value)
    out = tmp_path / "run"
    assert main(tiny(out, "trainer.max_steps=-1", "trainer.max_epochs=3")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert f"global step {BAD_STEP}" in lines[0] and "the base loss (simclr)" in lines[0]
    assert ("nan" if value != value else "inf") in lines[0] and "last.ckpt" in lines[0]
    assert last_step(out) == 3  # the end of epoch 1, written before the fault, loads
    assert not (out / "summary.json").exists()


def test_regularizer_term_is_named(tmp_path, capsys, monkeypatch):
    poison_term(monkeypatch, MetaMask, "drr", {1})
    out = tmp_path / "run"
    assert main(tiny(out, "regularizer=metamask", "trainer.checkpoint_every_n_steps=1")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "regularizer term 'drr' of metamask" in lines[0] and "global step 1" in lines[0]
    assert last_step(out) == 1  # the step checkpoint before the fault


def test_meta_gradient_is_named(tmp_path, capsys, monkeypatch):
    original = MetaMask.meta_step

    def meta_step(self, ctx):
        stats = original(self, ctx)
        if ctx.global_step == 2:
            for p in self.meta_parameters():
                p.grad = torch.full_like(p, float("nan"))
        return stats

    monkeypatch.setattr(MetaMask, "meta_step", meta_step)
    out = tmp_path / "run"
    assert main(tiny(out, "regularizer=metamask", "trainer.checkpoint_every_n_steps=1")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "meta objective of metamask (meta/gradient)" in lines[0] and "global step 2" in lines[0]
    assert last_step(out) == 2  # the encoder step of step 2 had finished (the meta step never applied)
    mask = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in mask.values() if v.is_floating_point())


def test_skip_policy_skips_a_bounded_number_of_steps(tmp_path, capsys, monkeypatch):
    """Two bad steps with a budget of 2: both skipped (weights untouched by them), the run finishes."""
    seen = []
    original = Regularizer.objective

    def objective(self, out, ctx):
        terms = original(self, out, ctx)
        seen.append(ctx.global_step)
        if len(seen) in (2, 3):  # the 2nd and 3rd batches: the step counter does not advance while skipping
            terms["base"] = terms["base"] * float("nan")
        return terms

    monkeypatch.setattr(Regularizer, "objective", objective)
    out = tmp_path / "run"
    assert main(tiny(out, "trainer.skip_nonfinite_steps=2", "trainer.max_steps=-1", "trainer.max_epochs=2")) == 0
    assert seen == [0, 1, 1, 1, 2, 3]  # 6 batches, 4 applied steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["metassl"]["nonfinite"]["skipped"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_skip_policy_stops_when_the_budget_is_spent(tmp_path, capsys, monkeypatch):
    poison_term(monkeypatch, Regularizer, "base", {1})  # every batch at step 1 is bad: the counter never moves on
    out = tmp_path / "run"
    assert main(tiny(out, "trainer.skip_nonfinite_steps=1")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "after skipping 1 non-finite step(s)" in lines[0] and "global step 1" in lines[0]


def _agree_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from metassl.engine.faults import agree_across_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        own = "base" if rank == 1 else None  # only rank 1 sees a non-finite term
        results[rank] = (agree_across_ranks(own, torch.device("cpu"), True),
                         agree_across_ranks(None, torch.device("cpu"), True))
    finally:
        dist.destroy_process_group()


def test_ranks_take_the_same_nonfinite_decision(tmp_path):
    """Under DDP a rank that skipped its backward alone would hang the others' all-reduce: the
    decision is shared (gloo, 2 processes)."""
    import torch.multiprocessing as mp

    from metassl.engine.faults import agree_across_ranks, describe_term

    results = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0] == ("other_rank", None) and results[1] == ("base", None)
    assert agree_across_ranks("base", torch.device("cpu"), False) == "base"  # one process: unchanged
    assert "another process" in describe_term("other_rank", "simclr", "none")
