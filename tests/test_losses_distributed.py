"""Two CPU processes (gloo) give the same losses and gradients as one process.

A fixed float64 batch of N = 8 is split in halves, one per rank.  Each rank computes the
loss on its half and backpropagates.  Per-rank losses are combined by their mean over
ranks (NT-Xent, MoCo, BYOL and SimSiam return local means; Barlow Twins and VICReg return
the global loss on every rank), and the gradient DDP would use for rank r's inputs is
``x_r.grad / world_size`` (the collectives' backward sums over ranks, DDP averages).
Both must equal the one-process loss and gradient on the full batch.
Tolerance: float64, ``rtol = 1e-9, atol = 1e-12``.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from metassl.losses import barlow_twins_loss, byol_loss, moco_infonce, nt_xent, simsiam_loss, vicreg_loss

WORLD = 2
N, DIM = 8, 5
RTOL, ATOL = 1e-9, 1e-12


def _data():
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    b = torch.randn(N, DIM, generator=g, dtype=torch.float64) * 0.4 + a * 0.5
    queue = F.normalize(torch.randn(11, DIM, generator=g, dtype=torch.float64), dim=1)
    return a, b, queue


def _cases(queue):
    """name -> (loss of (a, b), which inputs receive gradient)."""
    return {
        "nt_xent": (lambda a, b: nt_xent(a, b, 0.3), (True, True)),
        "moco": (lambda a, b: moco_infonce(a, b, queue, 0.2), (True, False)),
        "byol": (byol_loss, (True, False)),
        "simsiam": (simsiam_loss, (True, False)),
        "barlow_twins": (lambda a, b: barlow_twins_loss(a, b, lambd=0.05), (True, True)),
        "vicreg": (lambda a, b: vicreg_loss(a, b, 25.0, 25.0, 1.0), (True, True)),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        a, b, queue = _data()
        n = N // WORLD
        sl = slice(rank * n, (rank + 1) * n)
        results = {}
        for name, (fn, grads) in _cases(queue).items():
            xa = a[sl].clone().requires_grad_(grads[0])
            xb = b[sl].clone().requires_grad_(grads[1])
            loss = fn(xa, xb)
            loss.backward()
            results[name] = {
                "loss": loss.detach(),
                "ga": xa.grad if grads[0] else None,
                "gb": xb.grad if grads[1] else None,
            }
        results["momentum"] = _moco_keys_check(rank, a)
        results["collectives"] = _collectives_check(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _collectives_check(rank: int):
    from metassl.losses import distributed as D

    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    g = D.gather_with_grad(x)  # rows of rank 0 (ones), then rank 1 (twos)
    w = torch.arange(12, dtype=torch.float64).view(4, 3)
    (g * w).sum().backward()  # each rank: d/dx_r = w[slice r]; summed over 2 ranks
    s = D.all_reduce_sum(x.detach() * 1.0)
    m = D.all_reduce_mean(x.detach() * 1.0)
    return {"gathered": g.detach(), "grad": x.grad, "sum": s, "mean": m, "ws": D.world_size(), "rank": D.rank()}


def _moco_keys_check(rank: int, a: torch.Tensor):
    """MoCo's shuffle-BN path gives the same keys as no shuffling for a BN-free encoder, and
    the queue receives the keys of both ranks in rank order."""
    from torch import nn

    from metassl.methods import build_method

    torch.manual_seed(0)
    backbone = nn.Linear(DIM, 6).double()
    m = build_method("moco_v2", backbone, 6, queue_size=16, proj_hidden_dim=7, proj_output_dim=4).double()
    n = N // WORLD
    x = a[rank * n : (rank + 1) * n]
    m.shuffle_bn = True
    k_shuffled = m.keys(x)
    m.shuffle_bn = False
    k_plain = m.keys(x)
    out = m([x, x])
    m.update_after_step(out, 0.0)
    return {"shuffled": k_shuffled, "plain": k_plain, "queue": m.queue.clone(), "ptr": int(m.queue_ptr)}


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", ["nt_xent", "moco", "byol", "simsiam", "barlow_twins", "vicreg"])
def test_two_processes_match_one(results, name):
    a, b, queue = _data()
    fn, grads = _cases(queue)[name]
    xa, xb = a.clone().requires_grad_(grads[0]), b.clone().requires_grad_(grads[1])
    full = fn(xa, xb)
    full.backward()

    combined = torch.stack([r[name]["loss"] for r in results]).mean()
    torch.testing.assert_close(combined, full.detach(), rtol=RTOL, atol=ATOL)
    if name in ("barlow_twins", "vicreg"):  # global statistics: the same value on every rank
        torch.testing.assert_close(results[0][name]["loss"], results[1][name]["loss"], rtol=RTOL, atol=ATOL)

    n = N // WORLD
    for key, x in (("ga", xa), ("gb", xb)):
        if x.grad is None:
            continue
        ddp_grad = torch.cat([r[name][key] for r in results]) / WORLD
        torch.testing.assert_close(ddp_grad, x.grad, rtol=RTOL, atol=ATOL)
        assert ddp_grad[:n].abs().sum() > 0


def test_collectives(results):
    w = torch.arange(12, dtype=torch.float64).view(4, 3)
    for r, res in enumerate(results):
        c = res["collectives"]
        assert c["ws"] == WORLD and c["rank"] == r
        expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]).double()
        torch.testing.assert_close(c["gathered"], expected)
        torch.testing.assert_close(c["grad"], 2 * w[2 * r : 2 * r + 2])  # summed over both ranks
        torch.testing.assert_close(c["sum"], torch.full((2, 3), 3.0, dtype=torch.float64))
        torch.testing.assert_close(c["mean"], torch.full((2, 3), 1.5, dtype=torch.float64))


def test_moco_shuffle_bn_and_gathered_enqueue(results):
    n = N // WORLD
    for res in results:
        torch.testing.assert_close(res["momentum"]["shuffled"], res["momentum"]["plain"], rtol=RTOL, atol=ATOL)
    all_keys = F.normalize(torch.cat([res["momentum"]["plain"] for res in results]), dim=1)
    for res in results:
        assert res["momentum"]["ptr"] == N
        torch.testing.assert_close(res["momentum"]["queue"][:N], all_keys, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(results[0]["momentum"]["queue"], results[1]["momentum"]["queue"])
    assert n * WORLD == N
