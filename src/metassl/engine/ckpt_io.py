"""Checkpoint files that survive crashes, and one-line errors for files that are not ours.

Every checkpoint Lightning writes goes through :class:`AtomicCheckpointIO`: the bytes go to a
temporary file in the same folder, are flushed and fsynced, then ``os.replace`` moves them over
the old file (atomic on POSIX), and the folder entry is fsynced.  A process killed or a disk that
fills up mid-write leaves the previous ``last.ckpt`` untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.plugins.io import TorchCheckpointIO

from metassl.data.utils import atomic_torch_save
from metassl.errors import MetasslError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with a crash-safe write (temporary file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as err:  # full disk, read-only folder: nothing was replaced
            raise MetasslError(
                f"cannot write checkpoint {path} ({err.strerror or err}); the previous checkpoint in that folder is "
                "intact: free disk space or choose a writable output_dir, then resume=auto"
            ) from None


def check_training_checkpoint(path: str | Path, purpose: str) -> None:
    """One-line :class:`MetasslError` unless ``path`` is a readable metassl training checkpoint.

    The file checks are those of ``metassl analyze`` (:func:`metassl.analysis.features.inspect_file`:
    missing, empty, truncated or not a PyTorch file, no saved config); a plain ``state_dict``
    (``metassl export`` output) is refused here, since ``purpose`` (resume, eval, export) needs
    the whole run.
    """
    from metassl.analysis.features import inspect_file

    try:
        kind = inspect_file(path)
    except MetasslError as err:
        raise MetasslError(f"{purpose}: {err}") from None
    if kind != "checkpoint":
        raise MetasslError(
            f"{purpose}: {path} is a plain state_dict (`metassl export` output), not a training checkpoint; "
            "pass a run's checkpoints/last.ckpt"
        )


def check_resume_matches(path: str | Path, cfg: Mapping[str, Any]) -> None:
    """A checkpoint to resume from must come from the same method, regularizer and backbone."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]["cfg"]
    for section in ("method", "regularizer", "backbone"):
        was, now = saved[section]["name"], cfg[section]["name"]
        if was != now:
            raise MetasslError(
                f"resume={path}: that checkpoint was trained with {section}={was}, this run asks for {section}={now}; "
                f"pass {section}={was} or choose another output_dir to start a new run"
            )
