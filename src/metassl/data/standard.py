"""CIFAR-10/100 (python pickles) and STL-10 (binaries) in the torchvision on-disk format.

Files are read directly (fast, and tolerant of fake test fixtures without torchvision's md5
list); downloading uses torchvision's URLs, archive checksums and extraction.  A download
goes to a temporary folder that is moved into place only when complete, so a failed or
interrupted download never leaves files that look valid.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CorruptImageError, DatasetNotFoundError


@dataclass(frozen=True)
class _Spec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    tv_class: str


CIFAR_SPECS = {
    "cifar10": _Spec(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "labels", "label_names", "CIFAR10",
    ),
    "cifar100": _Spec(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", "CIFAR100",
    ),
}

STL_FOLDER = "stl10_binary"
STL_SIZE = 96
STL_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}


def default_root() -> Path:
    """Data root used when ``data.root`` is null: ``$METASSL_DATA_ROOT`` or ``~/.cache/metassl/data``."""
    env = os.environ.get("METASSL_DATA_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metassl" / "data"


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def download_archive(tv_class: str, root: Path, title: str) -> None:
    """Download and extract a torchvision dataset archive into ``root`` atomically."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(datasets, tv_class)
    dest = root / cls.base_folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".metassl-download-", dir=root))
    try:
        download_and_extract_archive(cls.url, download_root=str(tmp), filename=cls.filename, md5=cls.tgz_md5)
        src = tmp / cls.base_folder
        if not src.is_dir():
            raise RuntimeError(f"archive did not contain {cls.base_folder}/")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(src, dest)
    except Exception as e:  # network errors, checksum mismatch, disk full ...
        raise DatasetNotFoundError(
            f"{title} download from {cls.url} failed ({_one_line(e)}); nothing was written to {dest}. "
            f"Without network, copy the extracted {cls.base_folder}/ folder into {root} and set data.download=false"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _missing(folder: Path, files: list[str]) -> list[str]:
    return [f for f in files if not (folder / f).is_file()]


def _ensure(folder: Path, files: list[str], title: str, download: bool, tv_class: str, root: Path) -> None:
    missing = _missing(folder, files)
    if not missing:
        return
    if download:
        download_archive(tv_class, root, title)
        missing = _missing(folder, files)
        if not missing:
            return
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    raise DatasetNotFoundError(
        f"{title} not found: expected {folder} (missing {shown}); set data.download=true to download it, "
        f"or set data.root to the folder that contains {folder.name}/"
    )


def _unpickle(path: Path, title: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except Exception as e:
        raise CorruptImageError(
            f"{title} file {path} is unreadable ({_one_line(e)}); delete {path.parent} and set data.download=true"
        ) from None


def load_cifar(name: str, root: str | os.PathLike | None, download: bool = False) -> dict[str, Any]:
    """Load CIFAR-10/100 into memory.

    Returns ``{"train": (images, labels), "test": (images, labels), "classes": [...]}`` with
    images uint8 (N, 3, 32, 32) and labels int64 (N,).
    """
    spec = CIFAR_SPECS[name]
    root_p = Path(root).expanduser() if root is not None else default_root()
    folder = root_p / spec.folder
    _ensure(folder, [*spec.train_files, *spec.test_files, spec.meta_file], spec.title, download, spec.tv_class, root_p)

    def read(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            entry = _unpickle(folder / f, spec.title)
            try:
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(entry[spec.label_key], dtype=np.int64)
            except (KeyError, ValueError) as e:
                raise CorruptImageError(
                    f"{spec.title} file {folder / f} has an unexpected layout ({_one_line(e)}); "
                    f"delete {folder} and set data.download=true"
                ) from None
            if len(labels) != len(data):
                raise CorruptImageError(f"{spec.title} file {folder / f}: {len(data)} images but {len(labels)} labels")
            xs.append(data)
            ys.append(labels)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    meta = _unpickle(folder / spec.meta_file, spec.title)
    classes = list(meta.get(spec.names_key, []))
    return {"train": read(spec.train_files), "test": read(spec.test_files), "classes": classes}


class STLMemmapSource:
    """Lazily transposed images of an STL-10 binary file (column-major 3x96x96 records)."""

    def __init__(self, path: Path):
        self.path = path
        self._mm = _stl_memmap(path)

    def __len__(self) -> int:
        return self._mm.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._mm[i].transpose(0, 2, 1)))


def _stl_memmap(path: Path) -> np.ndarray:
    record = 3 * STL_SIZE * STL_SIZE
    size = path.stat().st_size
    if size == 0 or size % record:
        raise CorruptImageError(
            f"STL-10 file {path} has {size} bytes, not a multiple of {record}; "
            f"delete {path.parent} and set data.download=true"
        )
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(size // record, 3, STL_SIZE, STL_SIZE))


def load_stl10(
    root: str | os.PathLike | None, download: bool = False, in_memory: bool = True, splits=("train", "test", "unlabeled")
) -> dict[str, Any]:
    """Load STL-10 splits as ``{split: (images, labels)}`` plus ``classes``.

    Images are uint8 tensors (N, 3, 96, 96) when ``in_memory`` else memory-mapped sources;
    the unlabeled split has labels -1.
    """
    root_p = Path(root).expanduser() if root is not None else default_root()
    folder = root_p / STL_FOLDER
    needed = [f for s in splits for f in STL_FILES[s] if f is not None]
    _ensure(folder, needed, "STL-10", download, "STL10", root_p)
    out: dict[str, Any] = {}
    for split in splits:
        xf, yf = STL_FILES[split]
        source = STLMemmapSource(folder / xf)
        n = len(source)
        if yf is not None:
            labels = np.fromfile(folder / yf, dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != n or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
                raise CorruptImageError(
                    f"STL-10 file {folder / yf} does not match {folder / xf} ({len(labels)} labels, {n} images)"
                )
        else:
            labels = np.full(n, -1, dtype=np.int64)
        images: Any = source
        if in_memory:
            images = torch.from_numpy(np.ascontiguousarray(source._mm.transpose(0, 1, 3, 2)))
        out[split] = (images, torch.from_numpy(labels))
    names = folder / "class_names.txt"
    out["classes"] = names.read_text().split() if names.is_file() else [str(i) for i in range(10)]
    return out
