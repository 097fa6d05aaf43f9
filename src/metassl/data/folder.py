"""Image folders: labelled ``<dir>/<class>/**/<image>`` or unlabelled ``<dir>/**/<image>``.

Images are decoded to RGB uint8, resized (shorter side) and centre-cropped to a square
``load_size``, either all at once into one (N, 3, S, S) tensor (file reading in a thread
pool; JPEGs decoded with ``torchvision.io``, other formats with Pillow) or lazily per item.
Grayscale, palette, RGBA and 16-bit images become RGB uint8.  Undecodable files raise
:class:`CorruptImageError` naming the file.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from .errors import CorruptImageError, DataConfigError, DatasetNotFoundError
from .utils import atomic_torch_save, cache_key, try_load_cache

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _walk_images(folder: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return out


def _require_dir(folder: Path, what: str, layout: str) -> None:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{what} not found: expected a folder {folder} ({layout})")


def scan_labelled(folder: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Files and labels of a labelled folder (one sub-folder per class, sorted names).

    With ``classes`` given (e.g. from the train folder) their indices are used and any
    other class folder is an error.
    """
    root = Path(folder).expanduser()
    _require_dir(root, "labelled image folder", "layout <folder>/<class>/<image>")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DatasetNotFoundError(f"labelled image folder {root} has no class sub-folders (layout <folder>/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataConfigError(f"{root} has class folders not in the training classes: {', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for c in found:
        files = _walk_images(root / c)
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise DatasetNotFoundError(f"labelled image folder {root} contains no images ({', '.join(IMG_EXTENSIONS)})")
    return paths, labels, list(classes)


def scan_unlabelled(folder: str | os.PathLike) -> list[str]:
    """All image files under ``folder``, recursively, in sorted order."""
    root = Path(folder).expanduser()
    _require_dir(root, "image folder", "any images, in sub-folders or not")
    paths = _walk_images(root)
    if not paths:
        raise DatasetNotFoundError(f"image folder {root} contains no images ({', '.join(IMG_EXTENSIONS)})")
    return paths


def fit_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased) and centre-crop to size x size."""
    h, w = img.shape[-2:]
    if h == size and w == size:
        return img
    if min(h, w) != size:
        img = F.resize(img, size, antialias=True)
    return F.center_crop(img, [size, size])


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    """16-bit PNGs decode to uint16: scaled to 8 bits (the high byte of each value)."""
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:
        return (img.to(torch.int32) >> 8).to(torch.uint8)
    return (img.float().clamp(0, 1) * 255).round().to(torch.uint8)  # float decoders: [0, 1]


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _decode_with_pil(data: bytes) -> torch.Tensor:
    """Any format Pillow reads, to RGB uint8; 16-bit and 32-bit integer images scaled to 8 bits."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I"):  # "I;16*" (16-bit PNG/TIFF) or "I": integer grey levels beyond 255
            arr = np.asarray(im).astype(np.int64)
            arr = (arr >> 8) if arr.max(initial=0) > 255 else arr
            arr = np.repeat(arr.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
        else:
            arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_bytes(data: bytes, path: str) -> torch.Tensor:
    """JPEGs with torchvision's libjpeg decoder; every other format with Pillow (torchvision's PNG
    decoder crashes the process on some corrupt files: tests/reliability/test_properties.py)."""
    try:
        if _is_jpeg(data):
            try:
                return _to_uint8(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
            except Exception:  # noqa: BLE001 - variants libjpeg rejects: Pillow below, which names the problem
                pass
        return _decode_with_pil(data)
    except Exception as err:  # noqa: BLE001 - any undecodable file gets the same one line
        msg = " ".join(str(err).split()) or type(err).__name__
        raise CorruptImageError(f"cannot decode image file {path} ({msg[:200]}); replace or delete it") from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise CorruptImageError(f"cannot read image file {path} ({e.strerror or e})") from None


def load_image(path: str, size: int) -> torch.Tensor:
    """Decode one file to a uint8 (3, size, size) tensor."""
    return fit_square(_decode_bytes(_read(path), path), size)


class ImageFileSource:
    """Lazily decoded images: ``source[i]`` is the uint8 (3, size, size) tensor of ``paths[i]``."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size)

    def take(self, indices: Sequence[int]) -> "ImageFileSource":
        return ImageFileSource([self.paths[i] for i in indices], self.size)


def decode_all(paths: Sequence[str], size: int, workers: int | None = None, chunk: int = 512) -> torch.Tensor:
    """Decode ``paths`` into one uint8 tensor (N, 3, size, size).

    Files are read by a thread pool (I/O overlaps decoding); decoding runs in the calling
    thread (torchvision's decoders hold the GIL, so more threads would not help).
    """
    n = len(paths)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    workers = workers or min(8, (os.cpu_count() or 1) * 2)

    def read_chunk(start: int) -> list[bytes]:
        return [_read(p) for p in paths[start : start + chunk]]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start, blobs in zip(range(0, n, chunk), pool.map(read_chunk, range(0, n, chunk))):
            for j, img in enumerate(_decode_chunk(blobs, paths[start : start + len(blobs)])):
                out[start + j] = fit_square(img, size)
    return out


def _decode_chunk(blobs: list[bytes], paths: Sequence[str]) -> list[torch.Tensor]:
    """Decode a chunk: one batched libjpeg call when all are JPEGs, else (or on error) file by file."""
    if blobs and all(_is_jpeg(b) for b in blobs):
        try:
            tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB))
        except Exception:
            pass  # find (and name) the culprit below
    return [_decode_bytes(b, p) for b, p in zip(blobs, paths)]


def estimate_bytes(n: int, size: int) -> int:
    return n * 3 * size * size


def physical_memory() -> int | None:
    """Total RAM in bytes, when the platform tells."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_folder_tensor(
    paths: Sequence[str], size: int, cache_dir: str | os.PathLike | None = None, workers: int | None = None
) -> torch.Tensor:
    """Decode ``paths`` in memory, reusing or writing a ``.pt`` cache in ``cache_dir``.

    The cache key covers the file list, sizes, modification times and ``size``.
    """
    need = estimate_bytes(len(paths), size)
    ram = physical_memory()
    if ram is not None and need > 0.6 * ram:
        raise DataConfigError(
            f"decoding {len(paths)} images at {size}px needs {need / 2**30:.1f} GiB, more than 60% of RAM; "
            f"set data.in_memory=false or a smaller data.load_size"
        )
    path = None
    if cache_dir is not None:
        stats = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as e:
                raise CorruptImageError(f"cannot read image file {p} ({e.strerror or e})") from None
            stats.append((p, st.st_size, st.st_mtime_ns))
        key = cache_key({"v": 1, "size": size, "files": stats})
        path = Path(cache_dir).expanduser() / f"imagefolder_{len(paths)}x{size}_{key}.pt"
        blob = try_load_cache(path)
        if isinstance(blob, dict) and isinstance(blob.get("images"), torch.Tensor):
            images = blob["images"]
            if images.shape == (len(paths), 3, size, size) and images.dtype == torch.uint8:
                return images
    images = decode_all(paths, size, workers)
    if path is not None:
        atomic_torch_save({"images": images}, path)
    return images


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (covers every class of a sorted folder)."""
    if k >= n:
        return list(range(n))
    return np.linspace(0, n - 1, k).round().astype(np.int64).tolist()
