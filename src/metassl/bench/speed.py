"""Speed benchmark: views/s, step time and peak memory of every base method and every
base + regularizer, side by side with lightly's implementation of the same base method,
plus the throughput of the data pipeline.

What is timed is what trains: :func:`metassl.engine.step.training_step` (the function the
engine's LightningModule calls) with the real encoder optimizer (SGD with the engine's
parameter groups, :func:`metassl.engine.optim.build_optimizer`), the regularizer's own
meta optimizer, bf16 autocast around the whole step (as Lightning's ``bf16-mixed``) and
``channels_last`` applied where the engine applies it (the method's weights and the views).

lightly (optional extra): the same base method written with lightly's own heads and losses
(``SimCLRProjectionHead`` + ``NTXentLoss``, MoCo's ``NTXentLoss`` memory bank, ...) on the
same backbone object type, the same batch of views, the same precision and memory format,
in a minimal step loop as lightly's examples (forward each view, loss, backward, SGD step,
momentum update).  Head widths, temperatures and queue sizes are the metassl preset's.

Timing: every configuration is built once and warmed up; then ``--repeats`` rounds run
``--steps`` steps of every configuration in turn (interleaved, the order rotated every
round, so slow drifts of the machine hit all configurations alike; with ``--round-time``
a slow configuration runs fewer steps per round).  The step time is the median over rounds
of the per-round mean; views/s = batch x views / step time.

Shared machines: the CPU time that *other* processes used during each round is recorded
(``others_cpu_cores``); a round during which they used more than ``--busy-threshold``
cores is measured again (``--retries``).  With 2 torch threads on 2 cores a single busy
neighbour slows OpenMP regions by large factors (a 2.5 s step took up to 76 s here), so on
a busy machine ``--threads 1 --busy-threshold 1.25`` gives stable *ratios* (overheads,
metassl/lightly) at half the absolute speed.

Memory: CUDA: ``max_memory_allocated`` during a step minus the memory allocated before it.
CPU: the resident set size sampled every 2 ms during the last warm-up step, after
``malloc_trim`` (so that freed heap memory is not counted as free), minus the RSS before it:
the memory a step adds on top of weights and optimizer state (activations, gradients,
temporaries; on a configuration's first step also the optimizer's momentum buffers).

Data pipeline: views/s of ``metassl.data.build_data`` + ``DataLoader`` (the training
loader's settings) with ``num_workers`` 0 and 1, for each augmentation family used.

Usage::

    python -m metassl.bench.speed --quick                     # convnet_small, batch 64, ~2 min on 2 cores
    python -m metassl.bench.speed                             # resnet18, batch 256, bf16, channels_last
    python -m metassl.bench.speed --fastpath                  # SimCLR: fp32 / bf16, without / with channels_last
    python -m metassl.bench.speed --methods simclr,byol --regularizers metamask --steps 2

Writes ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md`` (default ``benchmarks/speed``,
``speed_quick`` with ``--quick``, ``speed_fastpath`` with ``--fastpath``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["main", "build_parser", "run", "to_markdown", "machine_info"]

NUM_VIEWS = 2
#: SGD for every method on both sides (like for like; the mirrored MetaMask step needs SGD).  The
#: lr does not change the cost; it is small so that no configuration diverges in the timed steps
#: (VICReg with plain SGD at lr 0.06 does, and a skipped meta step on NaN would flatter the time).
DEFAULT_OPTIMIZER = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "exclude_bias_and_norm": True, "lars_eta": 0.02}


# -- configuration -------------------------------------------------------------------------------
@dataclass
class Variant:
    precision: str  # fp32 | bf16
    channels_last: bool
    #: the backbone compiled in place with ``torch.compile`` (as ``trainer.compile=true``)
    compile: bool = False

    @property
    def label(self) -> str:
        return self.precision + (" + channels_last" if self.channels_last else "") + (" + compile" if self.compile else "")


@dataclass
class Case:
    impl: str  # metassl | lightly
    method: str
    regularizer: str
    variant: Variant
    step: Callable[[int], float] | None = None
    param_bytes: int = 0
    round_times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    others_cores: list[float] = field(default_factory=list)
    disturbed_times: list[float] = field(default_factory=list)
    #: rounds (index) that ended with a non-finite loss: the step may take shortcuts then
    nonfinite_rounds: list[int] = field(default_factory=list)
    nonfinite_warmup: bool = False
    steps_per_round: int = 1
    mem_mb: float | None = None
    last_loss: float | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.impl}:{self.method}+{self.regularizer}@{self.variant.label}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metassl bench speed",
        description="Speed of every method and method + regularizer (metassl.engine.step.training_step), "
        "side by side with lightly's implementation, and of the data pipeline.",
    )
    p.add_argument("--backbone", default=None, help="backbone name (default resnet18; convnet_small with --quick)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; 64 with --quick); views = 2 x batch")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="bf16 = autocast around the step")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True, help="(default)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile the backbone in place (as trainer.compile=true), for metassl and lightly alike: "
                   "off (default), on, or both (every configuration eager and compiled; the compiled ones' first "
                   "steps, which compile, are untimed warm-up)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration and round, at most (default 1; 3 with --quick); see --round-time")
    p.add_argument("--round-time", type=float, default=None,
                   help="target seconds per configuration and round: a configuration whose warm-up step took t seconds "
                   "runs min(--steps, ceil(round-time / t)) steps per round (default 1.0 with --quick, else 0 = always --steps)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--retries", type=int, default=2,
                   help="a round during which other processes used more than --busy-threshold CPU cores is measured "
                   "again, up to this many times (shared machines; default 2)")
    p.add_argument("--busy-threshold", type=float, default=0.25, help="see --retries (CPU cores used by other processes)")
    p.add_argument("--methods", default="all", help="comma-separated base methods (default: every registered one)")
    p.add_argument("--regularizers", default="all", help="comma-separated regularizers besides 'none' (default: every registered one; '' = none)")
    p.add_argument("--no-lightly", action="store_true", help="skip the lightly column")
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline measurement")
    p.add_argument("--data", default="builtin", help="data for the pipeline measurement: builtin or an imagefolder root (e.g. CIFAR-10 JPEG)")
    p.add_argument("--data-workers", default="0,1", help="num_workers values for the data pipeline")
    p.add_argument("--data-batches", type=int, default=None, help="timed batches per data configuration and round (default 4; 5 with --quick)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="convnet_small, batch 64, few steps: about 2 minutes on 2 CPU cores (mostly MetaMask's first steps)")
    p.add_argument("--fastpath", action="store_true",
                   help="SimCLR (+ lightly) in fp32 and bf16 autocast, each without and with channels_last")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument("--name", default=None, help="output file stem (default speed, speed_quick, speed_fastpath)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    args.backbone = args.backbone or ("convnet_small" if quick else "resnet18")
    args.batch = args.batch or (64 if quick else 256)
    args.steps = args.steps if args.steps is not None else (3 if quick else 1)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.repeats = args.repeats if args.repeats is not None else 3
    args.round_time = args.round_time if args.round_time is not None else (0.5 if quick else 0.0)
    args.data_batches = args.data_batches if args.data_batches is not None else (5 if quick else 4)
    if args.name is None:
        args.name = "speed_fastpath" if args.fastpath else ("speed_quick" if quick else "speed")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1 or args.batch < 2:
        raise SystemExit("metassl bench speed: --steps, --repeats and --warmup must be >= 1 and --batch >= 2")
    return args


# -- machine -------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(args: argparse.Namespace | None = None) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": _git_sha(),
    }
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    if args is not None and args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- memory --------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator statistics, or sampled RSS on CPU."""

    def __init__(self, device: str, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        gc.collect()
        _malloc_trim()
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._base) / 2**20


class Contention:
    """CPU time used by *other* processes during a block, in cores (from /proc/stat and
    /proc/self/stat; None where unavailable).  A shared machine inflates step times."""

    def __init__(self) -> None:
        self.others_cores: float | None = None

    @staticmethod
    def _machine() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        ncpu = sum(1 for line in open("/proc/stat") if line.startswith("cpu") and line[3:4].isdigit())
        return sum(vals) - vals[3] - vals[4], sum(vals), ncpu

    @staticmethod
    def _own() -> int:
        with open("/proc/self/stat") as f:
            text = f.read()
        fields = text[text.rindex(")") + 2 :].split()
        return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime

    def __enter__(self) -> "Contention":
        try:
            self._start = (*self._machine(), self._own())
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        try:
            busy, total, ncpu = self._machine()
            own = self._own()
        except (OSError, ValueError, IndexError):
            return
        d_total = total - self._start[1]
        if d_total <= 0:
            return
        others = (busy - self._start[0]) - (own - self._start[3])
        self.others_cores = max(0.0, others / d_total * ncpu)


# -- building the configurations -------------------------------------------------------------------
def _preset(group: str, name: str) -> dict[str, Any]:
    """Hyper-parameters of a method/regularizer preset (without ``name``); {} if none."""
    try:
        from omegaconf import OmegaConf

        from metassl.config import load_config

        cfg = load_config([f"{group}={name}"])
        section = OmegaConf.to_container(cfg[group], resolve=True)
        return {k: v for k, v in section.items() if k != "name"}
    except Exception:  # noqa: BLE001 - no preset: the class defaults
        return {}


def _method_hparams(name: str) -> dict[str, Any]:
    from metassl.methods import method_hparams

    values = dict(method_hparams(name))
    values.update(_preset("method", name))
    return values


def _autocast(device: str, variant: Variant):
    if variant.precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _backbone(args: argparse.Namespace) -> tuple[nn.Module, int]:
    from metassl.models.backbones import build_backbone

    return build_backbone(args.backbone, cifar_stem=None, input_size=args.image_size)


def _param_bytes(*modules: nn.Module) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _views(args: argparse.Namespace, variant: Variant, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g) for _ in range(NUM_VIEWS)]
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    views = [v.to(args.device) for v in views]
    if variant.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views, labels.to(args.device)


def build_metassl_case(args: argparse.Namespace, method_name: str, reg_name: str, variant: Variant) -> Case:
    from metassl.engine.optim import build_optimizer
    from metassl.engine.step import training_step
    from metassl.methods import build_method
    from metassl.regularizers import build_regularizer

    case = Case("metassl", method_name, reg_name, variant)
    torch.manual_seed(args.seed)
    backbone, feat_dim = _backbone(args)
    method = build_method(method_name, backbone, feat_dim, **_preset("method", method_name))
    reg = build_regularizer(reg_name, method, **_preset("regularizer", reg_name))
    method.to(args.device).train()
    reg.to(args.device).train()
    if variant.channels_last:  # as SSLModule.on_fit_start
        method.to(memory_format=torch.channels_last)
    if variant.compile:  # as train() with trainer.compile=true
        method.backbone.compile()
    named = list(method.named_parameters()) + [
        (f"regularizer.{n}", p) for n, p in reg.named_parameters() if any(p is q for q in reg.encoder_parameters())
    ]
    lr = DEFAULT_OPTIMIZER["lr"] * args.batch / 256
    enc_opt = build_optimizer(DEFAULT_OPTIMIZER, named, lr)
    meta_opt = reg.configure_meta_optimizer(1000)[0] if reg.bilevel else None
    views, labels = _views(args, variant, args.seed + 1)
    total = args.warmup + args.steps * args.repeats

    def step(i: int) -> float:
        with _autocast(args.device, variant):
            logs = training_step(method, reg, views, labels, enc_opt, meta_opt, progress=i / total, global_step=i)
        _sync(args.device)
        return float(logs["loss"])

    case.step = step
    case.param_bytes = _param_bytes(method, reg)
    return case


class _LightlyModel(nn.Module):
    """A base method written with lightly's building blocks, as lightly's examples."""

    def __init__(self, name: str, backbone: nn.Module, feat_dim: int, hp: dict[str, Any]) -> None:
        super().__init__()
        from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
        from lightly.models.modules import heads
        from lightly.models.utils import deactivate_requires_grad

        self.name = name
        self.backbone = backbone
        hid, out = hp.get("proj_hidden_dim"), hp.get("proj_output_dim")
        self.momentum = None
        if name == "simclr":
            self.projection = heads.SimCLRProjectionHead(feat_dim, hid, out)
            self.criterion = NTXentLoss(temperature=hp["temperature"])
        elif name == "moco_v2":
            self.projection = heads.MoCoProjectionHead(feat_dim, hid, out)
            self.criterion = NTXentLoss(temperature=hp["temperature"], memory_bank_size=(hp["queue_size"], out))
            self.momentum = hp["momentum"]
        elif name == "byol":
            self.projection = heads.BYOLProjectionHead(feat_dim, hid, out)
            self.prediction = heads.BYOLPredictionHead(out, hp["pred_hidden_dim"], out)
            self.criterion = NegativeCosineSimilarity()
            self.momentum = hp["momentum"]
        elif name == "simsiam":
            self.projection = heads.SimSiamProjectionHead(feat_dim, hid, out)
            self.prediction = heads.SimSiamPredictionHead(out, hp["pred_hidden_dim"], out)
            self.criterion = NegativeCosineSimilarity()
        elif name == "barlow_twins":
            self.projection = heads.BarlowTwinsProjectionHead(feat_dim, hid, out)
            self.criterion = BarlowTwinsLoss(lambda_param=hp["lambd"])
        elif name == "vicreg":
            self.projection = heads.VICRegProjectionHead(feat_dim, hid, out, num_layers=3)
            self.criterion = VICRegLoss(lambda_param=hp["sim_weight"], mu_param=hp["var_weight"], nu_param=hp["cov_weight"])
        else:
            raise KeyError(f"no lightly counterpart for method {name!r}")
        if self.momentum is not None:
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_momentum = copy.deepcopy(self.projection)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_momentum)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def embed_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        n = self.name
        if n in ("simclr", "barlow_twins", "vicreg"):
            return self.criterion(self.embed(x0), self.embed(x1))
        if n == "moco_v2":  # symmetrised like metassl's MoCo v2 (two queries, two keys)
            q0, q1 = self.embed(x0), self.embed(x1)
            k0, k1 = self.embed_momentum(x0), self.embed_momentum(x1)
            return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        if n == "byol":
            p0, p1 = self.prediction(self.embed(x0)), self.prediction(self.embed(x1))
            z0, z1 = self.embed_momentum(x0), self.embed_momentum(x1)
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        z0, z1 = self.embed(x0), self.embed(x1)  # simsiam
        p0, p1 = self.prediction(z0), self.prediction(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))

    @torch.no_grad()
    def after_step(self) -> None:
        if self.momentum is not None:
            from lightly.models.utils import update_momentum

            update_momentum(self.backbone, self.backbone_momentum, m=self.momentum)
            update_momentum(self.projection, self.projection_momentum, m=self.momentum)


def build_lightly_case(args: argparse.Namespace, method_name: str, variant: Variant) -> Case:
    case = Case("lightly", method_name, "none", variant)
    torch.manual_seed(args.seed)
    backbone, feat_dim = _backbone(args)
    model = _LightlyModel(method_name, backbone, feat_dim, _method_hparams(method_name)).to(args.device).train()
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    if variant.compile:  # the same backbone compiled the same way: a like-for-like control
        model.backbone.compile()
    lr = DEFAULT_OPTIMIZER["lr"] * args.batch / 256
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=DEFAULT_OPTIMIZER["momentum"], weight_decay=DEFAULT_OPTIMIZER["weight_decay"])
    views, _ = _views(args, variant, args.seed + 1)

    def step(i: int) -> float:
        opt.zero_grad(set_to_none=True)
        with _autocast(args.device, variant):
            loss = model.loss(views[0], views[1])
            loss.backward()
            opt.step()
            model.after_step()
        _sync(args.device)
        return float(loss.detach())

    case.step = step
    case.param_bytes = _param_bytes(model)
    return case


def _lightly_available() -> str | None:
    """None if lightly is importable, else the reason."""
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules.heads  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import problem means: skip the column
        return f"lightly not importable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); its column is skipped (pip install lightly)"
    return None


# -- running -------------------------------------------------------------------------------------
def _select(names: str, available: list[str], what: str) -> list[str]:
    if names == "all":
        return available
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise SystemExit(f"metassl bench speed: unknown {what} {', '.join(unknown)}; available: {', '.join(available)}")
    return chosen


def _registered() -> tuple[list[str], list[str]]:
    from metassl.methods import METHODS
    from metassl.regularizers import REGULARIZERS

    return sorted(METHODS), sorted(r for r in REGULARIZERS if r != "none")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _time_cases(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm-up (memory measured on the last warm-up step), then interleaved timed rounds."""
    for case in cases:
        try:
            for i in range(args.warmup):
                start = time.perf_counter()
                if i == args.warmup - 1:
                    with PeakMemory(args.device) as mem:
                        case.last_loss = case.step(i)
                    case.mem_mb = mem.peak_mb
                else:
                    case.last_loss = case.step(i)
                case.warmup_times.append(time.perf_counter() - start)
            case.nonfinite_warmup = not math.isfinite(case.last_loss)
            t = case.warmup_times[-1]
            case.steps_per_round = args.steps
            if args.round_time > 0:
                case.steps_per_round = max(1, min(args.steps, math.ceil(args.round_time / max(t, 1e-6))))
            _log(f"  warmed up {case.key}: loss {case.last_loss:.4f}, last warm-up step {t:.2f} s, "
                 f"step memory {case.mem_mb:.0f} MB, {case.steps_per_round} step(s) per round")
        except Exception as err:  # noqa: BLE001 - reported in the table, the others go on
            case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            _log(f"  FAILED {case.key}: {case.error}")
    live = [c for c in cases if c.error is None]
    for rnd in range(args.repeats):
        order = live[rnd % len(live):] + live[: rnd % len(live)] if live else []
        for case in order:
            try:
                k = case.steps_per_round
                for attempt in range(args.retries + 1):
                    with Contention() as busy:
                        start = time.perf_counter()
                        for s in range(k):
                            case.last_loss = case.step(args.warmup + rnd * k + s)
                        elapsed = (time.perf_counter() - start) / k
                    disturbed = busy.others_cores is not None and busy.others_cores > args.busy_threshold
                    if disturbed and attempt < args.retries:  # another process took CPU: measure this round again
                        case.disturbed_times.append(elapsed)
                        continue
                    if not math.isfinite(case.last_loss):
                        case.nonfinite_rounds.append(len(case.round_times))
                    case.round_times.append(elapsed)
                    if busy.others_cores is not None:
                        case.others_cores.append(busy.others_cores)
                    break
            except Exception as err:  # noqa: BLE001
                case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        _log(f"  round {rnd + 1}/{args.repeats} done")


def _case_result(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {
        "impl": case.impl,
        "method": case.method,
        "regularizer": case.regularizer,
        "precision": case.variant.precision,
        "channels_last": case.variant.channels_last,
        "compile": case.variant.compile,
        "params_mb": round(case.param_bytes / 2**20, 1),
    }
    if case.error or not case.round_times:
        res["error"] = case.error or "no timed round"
        return res
    valid = [x for i, x in enumerate(case.round_times) if i not in case.nonfinite_rounds]
    if case.nonfinite_rounds or case.nonfinite_warmup:
        # a diverged run may skip work (e.g. a meta step skipped on non-finite gradients)
        res["nonfinite_loss"] = {"in_warmup": case.nonfinite_warmup, "rounds": case.nonfinite_rounds}
    times = valid or case.round_times
    t = statistics.median(times)
    res.update(
        step_time_s=round(t, 4),
        step_time_min_s=round(min(times), 4),
        others_cpu_cores=round(statistics.mean(case.others_cores), 2) if case.others_cores else None,
        round_times_s=[round(x, 4) for x in case.round_times],
        warmup_times_s=[round(x, 4) for x in case.warmup_times],
        discarded_disturbed_rounds_s=[round(x, 4) for x in case.disturbed_times],
        steps_per_round=case.steps_per_round,
        views_per_s=round(args.batch * NUM_VIEWS / t, 1),
        step_mem_mb=None if case.mem_mb is None else round(case.mem_mb, 1),
        last_loss=case.last_loss,
    )
    return res


def _add_ratios(results: list[dict[str, Any]]) -> None:
    by_key = {(r["impl"], r["method"], r["regularizer"], r["precision"], r["channels_last"], r["compile"]): r for r in results}
    for r in results:
        if "step_time_s" not in r:
            continue
        if r["impl"] == "metassl" and r["regularizer"] != "none":
            base = by_key.get(("metassl", r["method"], "none", r["precision"], r["channels_last"], r["compile"]))
            if base and "step_time_s" in base:
                r["overhead_vs_base"] = round(r["step_time_s"] / base["step_time_s"], 3)
        if r["impl"] == "metassl" and r["regularizer"] == "none":
            other = by_key.get(("lightly", r["method"], "none", r["precision"], r["channels_last"], r["compile"]))
            if other and "step_time_s" in other:
                r["time_ratio_vs_lightly"] = round(r["step_time_s"] / other["step_time_s"], 3)
            eager = by_key.get(("lightly", r["method"], "none", r["precision"], r["channels_last"], False))
            if r["compile"] and eager and "step_time_s" in eager:  # what a user of either library gets out of the box
                r["time_ratio_vs_lightly_eager"] = round(r["step_time_s"] / eager["step_time_s"], 3)


def measure_data_pipeline(args: argparse.Namespace, families: list[str]) -> list[dict[str, Any]]:
    """views/s of build_data + DataLoader (shuffle, drop_last, the training loader's settings),
    for each augmentation family and ``num_workers``; ``--repeats`` interleaved rounds of
    ``--data-batches`` batches each (median and best round reported)."""
    from torch.utils.data import DataLoader

    from metassl.data import build_data

    workers = [int(w) for w in args.data_workers.split(",") if w.strip()]
    n_images = args.batch * (args.repeats * args.data_batches + 2)
    if args.data == "builtin":
        cfg: dict[str, Any] = {"name": "builtin", "num_train": n_images, "num_test": 10, "image_size": args.image_size}
        label = "builtin (generated shapes, in memory)"
    else:
        cfg = {"name": "imagefolder", "root": args.data, "subset": n_images, "test_subset": 10, "image_size": args.image_size}
        label = f"imagefolder {args.data} (decoded once into memory)"
    out: list[dict[str, Any]] = []
    runs: list[tuple[dict[str, Any], Any, list[float], list[float]]] = []
    for family in families:
        try:
            bundle = build_data(cfg, augmentation=family, num_views=NUM_VIEWS)
        except Exception as err:  # noqa: BLE001
            out.append({"dataset": label, "augmentation": family, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
            continue
        for w in workers:
            loader = DataLoader(bundle.train_ssl, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=w,
                                persistent_workers=w > 0)
            it = iter(loader)
            next(it)  # worker start-up and first batch not timed
            row = {"dataset": label, "augmentation": family, "num_workers": w, "batch": args.batch, "batches": args.data_batches}
            runs.append((row, it, [], []))
    for _ in range(args.repeats):
        for row, it, rates, others in runs:
            count = 0
            with Contention() as busy:
                start = time.perf_counter()
                for _ in range(args.data_batches):
                    views = next(it)[0]
                    count += sum(v.shape[0] for v in views)
                rates.append(count / (time.perf_counter() - start))
            if busy.others_cores is not None:
                # the loader's worker process is "another process" here: report what is left
                others.append(max(0.0, busy.others_cores - (1.0 if row["num_workers"] else 0.0)))
    for row, it, rates, others in runs:
        row.update(views_per_s=round(statistics.median(rates), 1), views_per_s_best=round(max(rates), 1),
                   others_cpu_cores=round(statistics.mean(others), 2) if others else None)
        out.append(row)
        _log(f"  data {row['augmentation']} workers={row['num_workers']}: {row['views_per_s']:.0f} views/s "
             f"(best {row['views_per_s_best']:.0f})")
    del runs
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything asked by ``args``; returns the JSON-ready result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    methods_all, regs_all = _registered()
    notes: list[str] = []
    if args.fastpath:
        methods = _select(args.methods if args.methods != "all" else "simclr", methods_all, "method")
        regs = ["none"]
        variants = [Variant("fp32", False), Variant("fp32", True), Variant("bf16", False), Variant("bf16", True)]
    else:
        methods = _select(args.methods, methods_all, "method")
        regs = ["none"] + (_select(args.regularizers, regs_all, "regularizer") if args.regularizers else [])
        variants = [Variant(args.precision, args.channels_last)]
    if args.compile == "on":
        variants = [Variant(v.precision, v.channels_last, True) for v in variants]
    elif args.compile == "both":
        variants = [Variant(v.precision, v.channels_last, c) for v in variants for c in (False, True)]
    lightly_reason = None if not args.no_lightly else "lightly column disabled (--no-lightly)"
    if lightly_reason is None:
        lightly_reason = _lightly_available()
    if lightly_reason:
        notes.append(lightly_reason)

    cases: list[Case] = []
    for variant in variants:
        for m in methods:
            for r in regs:
                try:
                    cases.append(build_metassl_case(args, m, r, variant))
                except Exception as err:  # noqa: BLE001
                    c = Case("metassl", m, r, variant, error=f"build failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                    cases.append(c)
            if lightly_reason is None:
                try:
                    cases.append(build_lightly_case(args, m, variant))
                except Exception as err:  # noqa: BLE001
                    cases.append(Case("lightly", m, "none", variant, error=f"build failed: {type(err).__name__}: {err}"))
    _log(f"metassl bench speed: {len(cases)} configurations, backbone {args.backbone}, batch {args.batch} x {NUM_VIEWS} views, "
         f"{', '.join(v.label for v in variants)}, device {args.device}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    _time_cases(cases, args)
    results = [_case_result(c, args) for c in cases]
    _add_ratios(results)
    data = []
    if not args.no_data and not args.fastpath:
        from metassl.methods import get_method_class

        families = sorted({get_method_class(m).augmentation for m in methods})
        data = measure_data_pipeline(args, families)
    notes += [
        "step time: median over interleaved rounds of the mean time of the round's steps; views/s = batch x 2 / step time; "
        "a round during which other processes used more than --busy-threshold cores is measured again (--retries)",
        "metassl: metassl.engine.step.training_step with SGD (engine parameter groups), meta optimizer of bilevel regularizers, "
        "autocast around the whole step for bf16; channels_last on the method's weights and the views (as SSLModule)",
        "lightly: lightly heads + losses, same backbone, views, precision and memory format; MoCo symmetrised like metassl "
        "(its memory bank is updated by both loss calls)",
        "step_mem_mb: " + ("CUDA max_memory_allocated during a step minus allocated before" if args.device == "cuda" else
                           "peak RSS during the last warm-up step minus RSS before it (after malloc_trim): activations, "
                           "gradients, temporaries (and optimizer state created on a first step)"),
    ]
    return {
        "benchmark": "speed",
        "machine": machine_info(args),
        "settings": {
            "backbone": args.backbone, "batch": args.batch, "views": NUM_VIEWS, "image_size": args.image_size,
            "variants": [v.label for v in variants], "device": args.device, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "round_time": args.round_time, "retries": args.retries, "busy_threshold": args.busy_threshold, "quick": args.quick, "fastpath": args.fastpath, "compile": args.compile,
        },
        "results": results,
        "data_pipeline": data,
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


# -- reporting -----------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def to_markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"### Speed: {s['backbone']}, batch {s['batch']} x {s['views']} views ({s['image_size']} px), {', '.join(s['variants'])}",
        "",
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads{', ' + m['gpu'] if m.get('gpu') else ''}), "
        f"torch {m['torch']}, lightly {m.get('lightly') or 'n/a'}, device {s['device']}; "
        f"{s['warmup']} warm-up step(s) + {s['repeats']} interleaved rounds of up to {s['steps']} step(s) per configuration; {m['date']}.",
        "",
    ]
    fast = s.get("fastpath")
    head = ("| method | regularizer | precision | step time (s) | best round (s) | views/s | overhead vs base | step memory (MB) "
            "| lightly views/s | metassl / lightly (time) |")
    lines += [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = result["results"]
    lightly = {(r["method"], r["precision"], r["channels_last"], r["compile"]): r for r in rows if r["impl"] == "lightly"}
    for r in rows:
        if r["impl"] != "metassl":
            continue
        prec = r["precision"] + (" + cl" if r["channels_last"] else "") + (" + compile" if r["compile"] else "")
        if "error" in r:
            lines.append(f"| {r['method']} | {r['regularizer']} | {prec} | failed: {r['error'][:80]} | | | | | | |")
            continue
        lt = lightly.get((r["method"], r["precision"], r["channels_last"], r["compile"])) if r["regularizer"] == "none" else None
        lv = _fmt(lt.get("views_per_s"), ".1f") if lt and "views_per_s" in lt else ("failed" if lt else "")
        ratio = _fmt(r.get("time_ratio_vs_lightly"), ".2f") if r["regularizer"] == "none" and lt else ""
        over = _fmt(r.get("overhead_vs_base"), ".2f") + "×" if r["regularizer"] != "none" and r.get("overhead_vs_base") else ""
        if r.get("nonfinite_loss"):
            all_bad = len(r["nonfinite_loss"]["rounds"]) == len(r["round_times_s"])
            prec += " (loss non-finite: timing not representative)" if all_bad else " (loss became non-finite: finite rounds timed)"
        lines.append(
            f"| {r['method']} | {r['regularizer']} | {prec} | {r['step_time_s']:.3f} | {r['step_time_min_s']:.3f} | {r['views_per_s']:.1f} | {over} | "
            f"{_fmt(r.get('step_mem_mb'), '.0f')} | {lv} | {ratio} |"
        )
    out_of_box = [r for r in rows if r["impl"] == "metassl" and r.get("time_ratio_vs_lightly_eager") is not None]
    if out_of_box:
        lines += ["", "metassl with `trainer.compile=true` against lightly as written (eager), step time ratio: "
                  + ", ".join(f"{r['method']} {r['time_ratio_vs_lightly_eager']:.2f}" for r in out_of_box)
                  + " (the compiled lightly rows above are the like-for-like control)."]
    busy = [r["others_cpu_cores"] for r in rows if r.get("others_cpu_cores") is not None]
    if busy and max(busy) > 0.2:
        lines += ["", f"**Shared machine:** other processes used {statistics.mean(busy):.2f} CPU cores on average (up to "
                  f"{max(busy):.2f}) while these steps were timed, so times are inflated and noisy; `step_time_min_s` in the "
                  "JSON is the least disturbed round."]
    if result.get("data_pipeline"):
        lines += ["", "Data pipeline (`build_data` + `DataLoader`, 2 views per image):", "",
                  "| dataset | augmentation | num_workers | views/s (median) | views/s (best round) |", "|---|---|---:|---:|---:|"]
        for d in result["data_pipeline"]:
            if "error" in d:
                lines.append(f"| {d['dataset']} | {d['augmentation']} | | failed: {d['error'][:80]} |")
            else:
                lines.append(f"| {d['dataset']} | {d['augmentation']} | {d['num_workers']} | {d['views_per_s']:.0f} | {d['views_per_s_best']:.0f} |")
    if fast:
        lines += ["", "Fast path: views/s relative to fp32 of the same implementation:", ""]
        for impl in ("metassl", "lightly"):
            base = next((r for r in rows if r["impl"] == impl and r["precision"] == "fp32" and "views_per_s" in r), None)
            if base:
                parts = [f"{r['precision'] + (' + channels_last' if r['channels_last'] else '')}: {r['views_per_s']:.1f} views/s "
                         f"({r['views_per_s'] / base['views_per_s']:.2f}×)" for r in rows if r["impl"] == impl and "views_per_s" in r]
                lines.append(f"- {impl} {base['method']}: " + "; ".join(parts))
    if result.get("notes"):
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _resolve_args(build_parser().parse_args(argv))
    result = run(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{args.name}.json", out_dir / f"{args.name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [r for r in result["results"] if "error" in r]
    return 1 if failed and len(failed) == len(result["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
