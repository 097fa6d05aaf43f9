"""Small helpers: atomic file writes and cache keys."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic_write(path: str | os.PathLike, mode: str, write: Callable[[Any], None], *, mkdir: bool) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, flush, fsync, give it the
    permissions a plain ``open`` would (mkstemp creates 0600), rename it into place and fsync
    the folder.  A crash mid-write never leaves a partial file under ``path``."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file in the same folder (created if missing), fsync
    and rename: a crash mid-write never leaves a partial file under ``path``."""
    _atomic_write(path, "wb", lambda fh: torch.save(obj, fh), mkdir=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync and rename."""
    _atomic_write(path, "w", lambda fh: fh.write(text), mkdir=False)


def cache_key(payload: Any) -> str:
    """Short stable hash of a JSON-serialisable payload."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def try_load_cache(path: str | os.PathLike) -> Any | None:
    """Load a cache written by :func:`atomic_torch_save`; ``None`` if absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
