"""MetaMask step cost against the base step, side by side in one process.

Every variant is one call of :func:`metassl.engine.step.training_step` (what trains), on
the same backbone, batch and views:

- ``base``: SimCLR with ``regularizer=none``;
- ``mm_no_meta``: MetaMask's encoder objective alone (masked features + the Barlow-Twins
  projector, no meta step): what the meta step adds is the difference to it;
- ``mm_first_order``, ``mm_second_order`` (the default: exact, ``order=reuse``),
  ``mm_finite_difference``: MetaMask, ``order=reuse``, all encoder parameters virtual;
- ``mm_official``: ``order=official``, ``grad_mode=finite_difference`` (the official code's
  algorithm: meta step from the updated weights with a fresh gradient, FD second order);
- ``mm_so_heads``: ``second_order_params=heads`` (full look-ahead, second-order term
  through the heads only);
- ``mm_fast``: ``virtual_params=heads`` (exact second order over the heads, backbone
  features replayed from the real step).

Timing: ``--warmup`` untimed rounds, then ``--reps`` rounds; each round runs every variant
once, in rotating order (interleaved), and the median per variant is reported, with the
minimum and the process CPU time (``time.process_time``: robust when other processes
share the cores; with ``--threads 1`` it is the work done).  Memory:
on CUDA ``torch.cuda.max_memory_allocated`` per step; on CPU the peak resident set size
during the step above the RSS just before it (sampled every 5 ms from
``/proc/self/statm``; a lower bound of the transient peak, since the allocator may reuse
memory it already holds), median over reps.

Usage::

    python benchmarks/metamask_overhead.py                                  # resnet18, batch 64
    python benchmarks/metamask_overhead.py --backbone convnet_small --batch 128
    python benchmarks/metamask_overhead.py --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path

import torch

from metassl.bench.metadata import run_metadata
from metassl.engine.optim import build_optimizer
from metassl.engine.step import training_step
from metassl.methods import build_method
from metassl.models.backbones import build_backbone
from metassl.regularizers import build_regularizer

VARIANTS: dict[str, dict | None] = {
    "base": None,
    "mm_no_meta": dict(order="official"),  # run without a meta optimizer: MetaMask's encoder step alone
    "mm_first_order": dict(grad_mode="first_order"),
    "mm_second_order": dict(grad_mode="second_order", backbone_tangent="difference"),  # default: backbone tangent by a feature difference
    "mm_second_order_jvp": dict(grad_mode="second_order", backbone_tangent="jvp"),
    "mm_finite_difference": dict(grad_mode="finite_difference"),
    "mm_fd_forward": dict(grad_mode="finite_difference", fd_scheme="forward"),
    "mm_official": dict(order="official", grad_mode="finite_difference"),
    "mm_so_heads": dict(second_order_params="heads"),
    "mm_fast": dict(virtual_params="heads", grad_mode="second_order"),
    "mm_second_order_amp": dict(grad_mode="second_order", meta_precision="autocast"),
    # the base model's passes alone, for the pass-count floor: forward (graph kept) and no-grad forward
    "pass_forward": None,
    "pass_forward_nograd": None,
}
PASSES = ("pass_forward", "pass_forward_nograd")
#: MetaMask variants whose meta-gradient is compared with the exact fp32 one (same state)
AGREEMENT = ("mm_second_order", "mm_first_order", "mm_finite_difference", "mm_fd_forward", "mm_so_heads", "mm_fast", "mm_second_order_amp")
DESCRIPTION = {
    "base": "SimCLR, regularizer none",
    "mm_no_meta": "MetaMask encoder step only (mask + L_drr head), no meta step",
    "mm_first_order": "MetaMask reuse, first order",
    "mm_second_order": "MetaMask reuse, second order with the backbone tangent by a feature difference (default)",
    "mm_second_order_jvp": "MetaMask reuse, exact second order by forward mode (jvp)",
    "mm_finite_difference": "MetaMask reuse, FD second order",
    "mm_fd_forward": "MetaMask reuse, one-sided FD second order (base point from the real forward)",
    "mm_official": "MetaMask official order, FD second order",
    "mm_so_heads": "MetaMask reuse, full look-ahead, second-order term through the heads",
    "mm_fast": "MetaMask reuse, heads-only virtual step, exact second order",
    "mm_second_order_amp": "MetaMask reuse, exact second order, outer pass under the step's autocast (meta_precision=autocast)",
    "pass_forward": "base model: forward + loss only (graph kept, no backward)",
    "pass_forward_nograd": "base model: forward only, no grad",
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class RSSPeak:
    """Peak resident set size (bytes) over a block, sampled by a thread."""

    def __init__(self, interval: float = 5e-3) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.start


def build(variant: str, args, device: torch.device):
    torch.manual_seed(0)
    backbone, feat_dim = build_backbone(args.backbone, cifar_stem=True)
    method = build_method("simclr", backbone, feat_dim, temperature=0.07, proj_hidden_dim=2048, proj_output_dim=256)
    kw = VARIANTS[variant]
    reg = build_regularizer("none", method) if kw is None else build_regularizer("metamask", method, **kw)
    method.to(device)
    reg.to(device)
    if args.channels_last:
        method.to(memory_format=torch.channels_last)
    named = list(method.named_trainable_parameters()) + [(f"regularizer.{n}", p) for n, p in reg.named_encoder_parameters()]
    opt_cfg = dict(name="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4, exclude_bias_and_norm=False)  # official optimizer
    opt = build_optimizer(opt_cfg, named, opt_cfg["lr"])
    meta_opt = reg.configure_meta_optimizer(1000)[0] if reg.bilevel and variant != "mm_no_meta" else None
    return method, reg, opt, meta_opt


def agreement(args, device: torch.device, views: list[torch.Tensor], autocast, names: list[str]) -> dict[str, dict[str, float]]:
    """Each approximate variant's meta-gradient against the exact fp32 second-order one, at
    the same state (one real step done, so momentum buffers exist; then the real backward of
    the next step under the run's precision): cosine and relative error."""
    from metassl.engine.step import encoder_objective
    from metassl.regularizers import StepContext

    method, reg, opt, meta_opt = build("mm_second_order", args, device)
    with autocast():
        training_step(method, reg, views, None, opt, meta_opt)
        opt.zero_grad(set_to_none=True)
        loss, _, out = encoder_objective(method, reg, views)
        loss.backward()
        ctx = StepContext(method=method, views=views, out=out, labels=None, encoder_optimizer=opt,
                          lr=opt.param_groups[0]["lr"], progress=0.0, global_step=0)
        # the reference: exact second order by forward mode, in fp32
        defaults = dict(grad_mode="second_order", backbone_tangent="jvp", fd_scheme="central", meta_precision="fp32",
                        virtual_params="all", second_order_params="all", tangent_radius=reg.tangent_radius)

        def meta_grad(options: dict) -> torch.Tensor:
            for k, val in {**defaults, **options}.items():
                setattr(reg, k, val)
            return reg.compute_meta_gradient(ctx).grads["logits"].double()

        ref = meta_grad({})
        first = meta_grad({"grad_mode": "first_order"})
        res = {"exact_second_order_term_rel": float((ref - first).norm() / ref.norm())}
        if args.radius_sweep:  # the feature-difference tangent's agreement against its radius
            sweep = {}
            for r in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
                g = meta_grad({"backbone_tangent": "difference", "tangent_radius": r})
                sweep[f"{r:g}"] = {"cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0)), "rel_error": float((g - ref).norm() / ref.norm())}
                print(f"tangent_radius {r:g}: {sweep[f'{r:g}']}", flush=True)
            res["tangent_radius_sweep"] = sweep
        for v in names:
            if v in AGREEMENT:
                g = meta_grad(VARIANTS[v])
                res[v] = {"cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0)), "rel_error": float((g - ref).norm() / ref.norm())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=64, help="images per view (2 views)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast of the training step (as trainer.precision=bf16-mixed)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma-separated (default: all; mm_second_order_amp only with --precision bf16)")
    ap.add_argument("--radius-sweep", action="store_true", help="also record the agreement of backbone_tangent=difference against tangent_radius")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.variants is None:
        args.variants = ",".join(v for v in VARIANTS if v != "mm_second_order_amp" or args.precision == "bf16")
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if "base" not in names:
        names.insert(0, "base")

    setups = {v: build(v, args, device) for v in names if v not in PASSES}
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device) for _ in range(2)]
    if args.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if args.precision == "bf16"
        else contextlib.nullcontext
    )

    def one_pass(v: str) -> None:
        method = setups["base"][0]
        with torch.no_grad() if v == "pass_forward_nograd" else contextlib.nullcontext():
            loss = method.loss(method(views))
        del loss

    def one_step(v: str) -> tuple[float, float, float]:
        method, reg, opt, meta_opt = setups[v if v not in PASSES else "base"]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        with RSSPeak() as rss:
            t0, c0 = time.perf_counter(), time.process_time()
            with autocast():
                if v in PASSES:
                    one_pass(v)
                    logs = None
                else:
                    logs = training_step(method, reg, views, None, opt, meta_opt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if logs is not None and not torch.isfinite(logs["loss"]):
            raise RuntimeError(f"{v}: non-finite loss")
        mem = (torch.cuda.max_memory_allocated() - base_mem) if device.type == "cuda" else rss.delta
        return dt, cpu, mem

    times: dict[str, list[float]] = {v: [] for v in names}
    cpus: dict[str, list[float]] = {v: [] for v in names}
    mems: dict[str, list[float]] = {v: [] for v in names}
    agree = agreement(args, device, views, autocast, names)
    load_before = os.getloadavg()
    t_start = time.time()
    for r in range(args.warmup + args.reps):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate to spread drift
        for v in order:
            dt, cpu, mem = one_step(v)
            if r >= args.warmup:
                times[v].append(dt)
                cpus[v].append(cpu)
                mems[v].append(mem)
        print(f"round {r + 1}/{args.warmup + args.reps}: " + ", ".join(f"{v} {times[v][-1] * 1e3:.0f}ms" for v in names if times[v]), flush=True)
    load_after = os.getloadavg()

    base = statistics.median(times["base"])
    base_min = min(times["base"])
    base_cpu = statistics.median(cpus["base"])
    rows = []
    for v in names:
        med = statistics.median(times[v])
        rows.append(
            dict(
                variant=v,
                description=DESCRIPTION[v],
                options=VARIANTS[v],
                step_ms=med * 1e3,
                min_ms=min(times[v]) * 1e3,
                max_ms=max(times[v]) * 1e3,
                ratio=med / base,
                ratio_min=min(times[v]) / base_min,
                cpu_ms=statistics.median(cpus[v]) * 1e3,
                ratio_cpu=statistics.median(cpus[v]) / base_cpu,
                peak_mem_mib=statistics.median(mems[v]) / 2**20,
            )
        )
    mem_label = "peak alloc (MiB)" if device.type == "cuda" else "peak RSS Δ (MiB)"
    lines = [
        f"| variant | wall ms (median) | × base | wall ms (min) | × base (min) | CPU ms (median) | × base (CPU) | {mem_label} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} ({row['description']}) | {row['step_ms']:.0f} | {row['ratio']:.2f} | {row['min_ms']:.0f} | "
            f"{row['ratio_min']:.2f} | {row['cpu_ms']:.0f} | {row['ratio_cpu']:.2f} | {row['peak_mem_mib']:.0f} |"
        )
    table = "\n".join(lines)
    floor = None
    if "pass_forward_nograd" in names:
        # any same-batch second-order step: MetaMask's encoder step + a forward and backward at θ'
        # (v = ∇θ' L_outer) + at least one backbone pass for the mixed second derivative (one-sided FD)
        enc = statistics.median(times["mm_no_meta"]) if "mm_no_meta" in names else base
        floor = (enc + base + statistics.median(times["pass_forward_nograd"])) / base
        table += (f"\n\nPass-count floor of any same-batch second-order meta step: {floor:.2f}× base "
                  f"(encoder step {enc / base:.2f} + forward/backward at θ' 1.00 + one no-grad forward "
                  f"{statistics.median(times['pass_forward_nograd']) / base:.2f}).")
    if agree:
        table += ("\n\nMeta-gradient vs exact fp32 second order (same state; the exact second-order term is "
                  f"{agree['exact_second_order_term_rel']:.3f} of its norm): "
                  + "; ".join(f"{k}: cos {d['cosine']:.4f}, rel. err {d['rel_error']:.3g}" for k, d in agree.items() if isinstance(d, dict) and "cosine" in d))
    info = dict(
        **run_metadata(),
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        dtype="float32" if args.precision == "fp32" else "bf16 autocast (meta step fp32 unless meta_precision=autocast)",
        channels_last=args.channels_last,
        backbone=f"{args.backbone} (CIFAR stem)",
        batch=args.batch,
        views=2,
        image_size=args.image_size,
        reps=args.reps,
        warmup=args.warmup,
        loadavg_before=load_before,
        loadavg_after=load_after,
        wall_s=time.time() - t_start,
        max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print()
    print(f"{info['backbone']}, batch {args.batch}×2 views, {info['dtype']}, {info['device'] if device.type == 'cuda' else info['cpu']}, "
          f"{info['torch_threads']} threads, torch {info['torch']}")
    print(table)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not isinstance(results, dict) or "runs" not in results:
        results = {"runs": {}}
    key = f"{args.backbone}-b{args.batch}-{args.precision}{'-cl' if args.channels_last else ''}-{device.type}-t{torch.get_num_threads()}"
    results["runs"][key] = dict(
        machine=info,
        rows=rows,
        table=table,
        floor_ratio=floor,
        agreement=agree,
        times_ms={v: [t * 1e3 for t in ts] for v, ts in times.items()},
        cpu_ms={v: [t * 1e3 for t in ts] for v, ts in cpus.items()},
    )
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out} [{key}]")


if __name__ == "__main__":
    main()
