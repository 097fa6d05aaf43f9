"""Shared helpers of the reliability tests: tiny runs through the real CLI."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = ["protocol=smoke", "data.num_train=96", "data.num_test=40", "method.proj_hidden_dim=32", "method.proj_output_dim=16",
        "eval.knn.k=5", "eval.knn_init=false", "logger.tensorboard=false", "trainer.precision=32-true",
        "trainer.channels_last=false", "backbone.widths=[8,8,16,16]"]


def tiny(out: Path, *extra: str) -> list[str]:
    """``metassl train`` arguments of a seconds-long run writing to ``out``."""
    return ["train", *TINY, f"output_dir={out}", *extra]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("metassl: error:")]


def last_step(out: Path) -> int:
    """The global step saved in ``out``'s last.ckpt (it must load)."""
    return int(torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])
