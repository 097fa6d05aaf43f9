"""Views per second: per-sample torchvision augmentation vs. the batched augmentation.

Synthetic CIFAR-size data (N random uint8 images 3x32x32, in memory), SimCLR recipe at 32 px,
two views per image.  Rows, for each intra-op thread count in ``--threads``:

* ``per-sample loop``: ``build_ssl_transform('simclr', 32, ...)`` called image by image in the
  main process;
* ``per-sample DataLoader wK``: the same transform in a ``DataLoader`` with K workers, batch
  ``--batch`` (persistent workers; the timed epoch is the second, so worker start-up is excluded);
* ``batched cpu``: ``build_batched_ssl_transform`` on batches of ``--batch``;
* ``batched cuda``: the same on the GPU when one is present (batch already on the device).

Prints a markdown table and writes ``benchmarks/batched_aug_speed.json`` (with
:func:`metassl.bench.metadata.run_metadata`).  For reference, the SimCLR model step alone reaches
about 490 img/s on the 2-core machine.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/batched_aug_speed.py --threads 1          # quick check
    python benchmarks/batched_aug_speed.py                                         # 1 and 2 threads
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from metassl.bench.metadata import run_metadata
from metassl.data.batched_aug import build_batched_ssl_transform
from metassl.data.transforms import NORMALIZATION_STATS, build_ssl_transform

HERE = Path(__file__).resolve().parent
MEAN, STD = NORMALIZATION_STATS["cifar10"]
NUM_VIEWS = 2


class AugmentedImages(Dataset):
    """In-memory uint8 images, each returned as the list of its augmented views."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def time_per_sample_loop(images: torch.Tensor) -> float:
    """Seconds to make every view of every image, one image at a time."""
    transform = build_ssl_transform("simclr", 32, MEAN, STD, num_views=NUM_VIEWS)
    transform(images[0])
    start = time.perf_counter()
    for img in images:
        transform(img)
    return time.perf_counter() - start


def time_dataloader(images: torch.Tensor, workers: int, batch: int) -> float:
    """Seconds for one (second, warm) epoch of a per-sample DataLoader."""
    transform = build_ssl_transform("simclr", 32, MEAN, STD, num_views=NUM_VIEWS)
    loader = DataLoader(AugmentedImages(images, transform), batch_size=batch, num_workers=workers,
                        persistent_workers=True, shuffle=False)
    for _ in loader:  # warm-up epoch: starts the workers
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    elapsed = time.perf_counter() - start
    del loader
    return elapsed


def time_batched(images: torch.Tensor, batch: int, device: str) -> float:
    """Seconds to make every view with the batched path (batches already on ``device``)."""
    transform = build_batched_ssl_transform("simclr", 32, MEAN, STD, num_views=NUM_VIEWS)
    batches = list(images.to(device).split(batch))
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    transform(batches[0], generator)
    sync()
    start = time.perf_counter()
    for b in batches:
        transform(b, generator)
    sync()
    return time.perf_counter() - start


def measure(images: torch.Tensor, threads: int, batch: int, loop_images: int, workers: list[int]) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []

    def row(path: str, n: int, seconds: float) -> None:
        rows.append({"path": path, "threads": threads, "images": n, "views": n * NUM_VIEWS,
                     "seconds": round(seconds, 4), "views_per_s": round(n * NUM_VIEWS / seconds, 1)})

    sub = images[:loop_images]
    row("per-sample loop", len(sub), time_per_sample_loop(sub))
    for k in workers:
        row(f"per-sample DataLoader w{k}", len(images), time_dataloader(images, k, batch))
    row("batched cpu", len(images), time_batched(images, batch, "cpu"))
    if torch.cuda.is_available():
        row("batched cuda", len(images), time_batched(images, batch, "cuda"))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| path | torch threads | views | seconds | views/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['threads']} | {r['views']} | {r['seconds']:.3f} | {r['views_per_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="synthetic images in memory")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    ap.add_argument("--loop-images", type=int, default=1024, help="images for the main-process per-sample loop")
    ap.add_argument("--out", type=Path, default=HERE / "batched_aug_speed.json")
    args = ap.parse_args()
    images = synthetic_images(args.n)
    rows = [r for t in args.threads for r in measure(images, t, args.batch, min(args.loop_images, args.n), args.workers)]
    table = markdown(rows)
    print(table)
    config = {"n": args.n, "image_size": 32, "augmentation": "simclr", "num_views": NUM_VIEWS, "batch": args.batch}
    args.out.write_text(json.dumps({**run_metadata(), "config": config, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
