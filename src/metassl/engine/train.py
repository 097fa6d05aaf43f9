"""``metassl train``: data, model, Lightning Trainer, run folder, summary."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from metassl.config import ConfigError
from metassl.errors import MetasslError
from metassl.data import DataBundle, augmentation_for, build_data
from metassl.data.utils import atomic_write_text
from metassl.engine.artifacts import best_val_epoch, merge_metrics, plot_curves, read_metrics, set_aside_metrics, write_summary
from metassl.engine.ckpt_io import AtomicCheckpointIO, check_resume_matches, check_training_checkpoint
from metassl.engine.data_order import ResumableSampler, SeededItems
from metassl.engine.evaluation import evaluate_backbone, knn_key
from metassl.engine.module import SSLModule
from metassl.engine.precision import resolve_precision
from metassl.regularizers.base import get_regularizer_class


class IndexedDataset(Dataset):
    """Wraps a ``(x, y)`` dataset to also return the sample index (for the kNN validation split)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i][:2]
        return x, y, i


def resolve_num_workers(value: Any) -> int:
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1)) if cores > 2 else 0


def default_output_dir(cfg: DictConfig) -> Path:
    parts = [cfg.method.name] + ([cfg.regularizer.name] if cfg.regularizer.name != "none" else []) + [cfg.data.name]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{'-'.join(parts)}-{stamp}"


def knn_val_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Seeded held-out part of the labelled train split, used to select the best checkpoint."""
    mask = torch.zeros(n, dtype=torch.bool)
    n_val = int(round(n * fraction))
    if n_val > 0:
        mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val]] = True
    return mask


def _check_runtime(cfg: DictConfig, precision: str) -> None:
    cuda = torch.cuda.is_available()
    accel = cfg.trainer.accelerator
    if accel in ("gpu", "cuda") and not cuda:
        raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; use trainer.accelerator=cpu")
    on_cpu = accel == "cpu" or not cuda
    if on_cpu and precision == "16-mixed":
        raise ConfigError("trainer.precision=16-mixed needs a GPU; on CPU use trainer.precision=bf16-mixed")
    if on_cpu and cfg.trainer.sync_batchnorm:
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (SyncBatchNorm fails on CPU); set it to false")


def check_eval_data(data: DictConfig) -> None:
    """Training and evaluation need labelled eval splits (kNN bank and test set)."""
    if data.name != "imagefolder" or data.get("labelled", True):
        return
    missing = [key for key in ("eval_train_dir", "test_dir") if data.get(key) is None]
    if missing:
        keys = " and ".join(f"data.{key}=<folder with one subfolder per class>" for key in missing)
        raise ConfigError(
            f"data.labelled=false reads data.train_dir as unlabelled images, but the kNN monitor and the evaluation "
            f"need labelled folders: set {keys}"
        )


def _resolve_resume(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint to resume from (None: a new run), checked to be a readable metassl
    checkpoint of the same method, regularizer and backbone."""
    last = out / "checkpoints" / "last.ckpt"
    if cfg.resume is None:
        if last.exists():
            raise ConfigError(
                f"{out} already holds a run (checkpoints/last.ckpt); pass resume=auto to continue it or choose another output_dir"
            )
        return None
    if cfg.resume == "auto":
        if not last.exists():
            return None
        path = str(last)
    elif not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint file")
    else:
        path = str(cfg.resume)
    try:
        check_training_checkpoint(path, f"resume={cfg.resume}")
    except MetasslError as err:
        raise MetasslError(f"{err}; or delete it to start the run over") from None
    check_resume_matches(path, cfg)
    return path


def _check_knn_k(cfg: DictConfig, bank: int) -> None:
    """A kNN ``k`` (``eval.knn.k``, ``eval.knn_extra``) above the smallest bank it votes in (the
    labelled train split without its validation part) is clamped to the bank by the kNN; say so
    once, in one line (small folders and ``protocol=smoke`` rely on the clamp)."""
    for k in [int(cfg.eval.knn.k)] + [int(p[0]) for p in cfg.eval.knn_extra]:
        if k > bank:
            print(f"metassl: note: kNN k={k} is larger than the kNN bank ({bank} labelled train images after "
                  f"eval.val_fraction={cfg.eval.val_fraction}); the kNN votes with all {bank} (set eval.knn.k to choose)",
                  file=sys.stderr)


def _ensure_writable(out: Path) -> None:
    """Create the run folder and prove it takes files, before any work is done."""
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / ".metassl-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to the run folder {out} ({err.strerror or err}); choose a writable output_dir=PATH"
        ) from None


def build_module_config(cfg: DictConfig, bundle: DataBundle) -> dict[str, Any]:
    """The resolved plain-dict config stored in checkpoints (backbone stem decided from the data)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain["backbone"].get("cifar_stem") is None:
        plain["backbone"]["cifar_stem"] = bundle.image_size <= 64
    return plain


def single_process(cfg: DictConfig) -> bool:
    """True when the run trains in this one process (no distributed sampler will be put in)."""
    devices, nodes = cfg.trainer.devices, int(cfg.trainer.num_nodes)
    one = devices == 1 or (OmegaConf.is_list(devices) and len(devices) == 1) or str(devices) == "1"
    return one and nodes == 1 and os.environ.get("WORLD_SIZE", "1") in ("", "1")


def make_loaders(cfg: DictConfig, bundle: DataBundle) -> tuple[DataLoader, list[DataLoader]]:
    """The training loader and the two kNN-monitor loaders.  In one process the training loader
    uses a :class:`ResumableSampler` (its place in the epoch is checkpointed); with
    ``trainer.deterministic=true`` each sample's augmentation is seeded by (seed, epoch, index);
    with ``data.augment_on=device`` the order is seeded by (seed, epoch) and the views by batch."""
    workers = resolve_num_workers(cfg.num_workers)
    pin = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    if len(bundle.train_ssl) < cfg.batch_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training set ({len(bundle.train_ssl)} images); lower batch_size"
        )
    if single_process(cfg):
        seeded = bool(cfg.trainer.deterministic)
        sampler = ResumableSampler(len(bundle.train_ssl), seed=int(cfg.seed), seeded=seeded, batch_size=int(cfg.batch_size),
                                   seeded_order=seeded or bundle.batch_views is not None)
        dataset = SeededItems(bundle.train_ssl, int(cfg.seed)) if seeded else bundle.train_ssl
        generator = torch.Generator().manual_seed(int(cfg.seed)) if seeded else None  # workers' seeds off the global stream
        train = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, generator=generator, **common)
    else:  # Lightning puts in its distributed sampler
        train = DataLoader(bundle.train_ssl, batch_size=cfg.batch_size, shuffle=True, drop_last=True, **common)
    val = [
        DataLoader(IndexedDataset(ds), batch_size=cfg.eval.batch_size, shuffle=False, **common)
        for ds in (bundle.train_eval, bundle.test)
    ]
    return train, val


def _is_global_zero_process() -> bool:
    """False in the processes a distributed launcher started for ranks > 0 (they skip work
    that rank 0 does for everyone before ``fit``)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _eval_device(cfg: DictConfig) -> torch.device:
    """The device of rank 0's forward passes before ``fit``: its GPU when the run uses CUDA
    (not for fork strategies, which need CUDA uninitialised until they fork), else the CPU."""
    accel, strategy = cfg.trainer.accelerator, str(cfg.trainer.strategy)
    if not torch.cuda.is_available() or accel not in ("auto", "gpu", "cuda") or "fork" in strategy or "notebook" in strategy:
        return torch.device("cpu")
    devices = cfg.trainer.devices
    first = devices[0] if OmegaConf.is_list(devices) and len(devices) else 0
    return torch.device("cuda", int(first))


def initial_knn(cfg: DictConfig, module: SSLModule, bundle: DataBundle, out: Path, resuming: bool) -> float | None:
    """kNN top-1 of the untrained network (random init at ``seed``, test split, the run's k and t),
    computed before training and kept in ``<out>/knn_init.json``; a resumed run reads it back."""
    if not cfg.eval.knn_init or not _is_global_zero_process():
        return None
    k, t = int(cfg.eval.knn.k), float(cfg.eval.knn.t)
    key = {"k": k, "t": t, "features": str(cfg.eval.features), "seed": int(cfg.seed)}
    record = out / "knn_init.json"
    if resuming and record.is_file():
        saved = json.loads(record.read_text())
        if all(saved.get(name) == value for name, value in key.items()):
            return saved["knn_top1_init"]
    device = _eval_device(cfg)
    with torch.random.fork_rng(devices=[]):  # the loaders draw seeds: training's random stream stays as without this
        module.to(device)
        try:
            results = evaluate_backbone(module.method.backbone, module.eval_transform(), bundle, knn_pairs=[(k, t)],
                                        batch_size=int(cfg.eval.batch_size), device=device, seed=int(cfg.seed))
        finally:
            module.to("cpu")
    value = results[knn_key(k, t)]
    atomic_write_text(record, json.dumps({**key, "knn_top1_init": value}, indent=2) + "\n")
    return value


def _quiet_lightning() -> None:
    """Drop Lightning messages that mislead here: the run folder is ours (config.yaml is written
    before the CSV logger starts, and resumed runs keep their earlier metrics), and the tips."""
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "Tip:" not in record.getMessage())


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate, and write the run folder. Returns the summary dict."""
    _quiet_lightning()
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator), str(cfg.trainer.strategy))
    _check_runtime(cfg, precision)
    check_eval_data(cfg.data)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    ckpt_path = _resolve_resume(cfg, out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    needs = get_regularizer_class(cfg.regularizer.name).data_requirements  # e.g. ("clean",): the un-augmented image
    bundle = build_data(OmegaConf.to_container(cfg.data, resolve=True), augmentation=augmentation_for(cfg.method.name),
                        num_views=2, clean_view="clean" in needs)
    module_cfg = build_module_config(cfg, bundle)
    try:
        module = SSLModule(module_cfg, num_classes=bundle.num_classes)
    except (ValueError, KeyError, TypeError) as err:  # a value the builders reject, e.g. metamask grad_mode, a backbone keyword
        raise ConfigError(str(err).strip("'\"").splitlines()[0]) from None
    module.batch_views, module.batch_clean = bundle.batch_views, bundle.batch_clean  # data.augment_on=device
    held_out = knn_val_mask(len(bundle.train_eval), float(cfg.eval.val_fraction), int(cfg.seed))
    module.knn_val_mask = held_out if bool(held_out.any()) else None  # eval.val_fraction=0: no validation kNN
    _check_knn_k(cfg, int((~held_out).sum()) if bool(held_out.any()) else len(bundle.train_eval))
    _ensure_writable(out)
    knn_init = initial_knn(cfg, module, bundle, out, resuming=ckpt_path is not None)
    if cfg.trainer.compile:
        # in place (nn.Module.compile): parameter names and checkpoint keys stay those of the
        # eager model, so a compiled run resumes, evaluates and exports like any other
        module.method.backbone.compile()
    train_loader, val_loaders = make_loaders(cfg, bundle)
    if isinstance(train_loader.sampler, ResumableSampler):
        module.train_sampler = train_loader.sampler

    seconds_before = 0.0  # training seconds of the processes before the checkpoint this run resumes from
    if ckpt_path is not None:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # scalars only: no full read
        set_aside_metrics(out, before_step=int(state.get("global_step", 0)))
        seconds_before = float((state.get("metassl") or {}).get("train_seconds", 0.0))
        del state
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(module_cfg)))
    # flushed at every logging step: a killed run keeps every row up to its last checkpoint
    loggers: list = [CSVLogger(save_dir=str(out), name="", version="", flush_logs_every_n_steps=1)]
    use_tb = cfg.logger.tensorboard
    if use_tb == "auto":
        try:
            import tensorboard  # noqa: F401

            use_tb = True
        except ImportError:
            use_tb = False
    if use_tb:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    if not cfg.logger.csv:
        loggers = loggers[1:]

    has_val = float(cfg.eval.val_fraction) > 0
    # Two callbacks: Lightning (>= 2.5) writes a ModelCheckpoint's ``save_last`` file only when its
    # top-k file is written too, so with a monitor the "last" checkpoint would stay at the best
    # epoch.  "last" is therefore its own unmonitored checkpoint, rewritten at every epoch end.
    callbacks = [ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="last", monitor=None, save_top_k=1,
                                 save_on_train_epoch_end=True, enable_version_counter=False)]
    every = int(cfg.trainer.checkpoint_every_n_steps)
    if every > 0:  # mid-epoch "last" too (same file): a killed run loses at most `every` steps
        callbacks.append(ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="last", monitor=None, save_top_k=1,
                                         every_n_train_steps=every, enable_version_counter=False))
    if has_val:
        callbacks.append(ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor="val/knn_top1",
                                         mode="max", save_top_k=1, enable_version_counter=False))
    trainer = L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=precision,
        sync_batchnorm=cfg.trainer.sync_batchnorm,
        deterministic=cfg.trainer.deterministic,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        limit_train_batches=cfg.trainer.limit_train_batches,
        check_val_every_n_epoch=cfg.eval.knn.every_n_epochs,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(out),
        plugins=[AtomicCheckpointIO()],
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loaders, ckpt_path=ckpt_path)
    # a resumed run: its whole time, from the checkpoint and this clock (not from the module: spawn
    # strategies load the checkpoint and fit in child processes, this process's module never sees it)
    train_seconds = seconds_before + time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    return finish_run(cfg, module, trainer, bundle, out, train_seconds, precision=precision, knn_init=knn_init)


def finish_run(cfg: DictConfig, module: SSLModule, trainer: L.Trainer, bundle: DataBundle, out: Path, train_seconds: float,
               *, precision: str, knn_init: float | None) -> dict[str, Any]:
    """Final evaluation on the last weights, curves, regularizer artefacts and summary.json."""
    k, t = int(cfg.eval.knn.k), float(cfg.eval.knn.t)
    pairs = [(k, t)] + [tuple(p) for p in cfg.eval.knn_extra]
    device = module.device
    module.eval()
    results = evaluate_backbone(
        module.method.backbone,
        module.eval_transform(),
        bundle,
        knn_pairs=pairs,
        linear=OmegaConf.to_container(cfg.eval.linear) if cfg.eval.linear_probe else None,
        val_fraction=float(cfg.eval.val_fraction),
        batch_size=int(cfg.eval.batch_size),
        device=device,
        seed=int(cfg.seed),
    )
    merge_metrics(out)
    rows = read_metrics(out / "metrics.csv")
    epochs, steps = int(trainer.current_epoch), int(trainer.global_step)
    last = out / "checkpoints" / "last.ckpt"
    if "spawn" in str(cfg.trainer.strategy) and last.is_file():
        # spawn strategies (ddp_spawn) train in child processes: this process's trainer does not
        # count their steps, but rank 0 wrote the last checkpoint (and Lightning copied its
        # weights back)
        state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)  # two scalars: no full read
        steps = int(state.get("global_step", 0))
        epochs = int(state.get("epoch", -1)) + 1  # saved at the end of that (0-based) epoch
    best = best_val_epoch(rows)
    test_by_epoch = [r["test/knn_top1"] for r in rows if "test/knn_top1" in r]
    summary = {
        "knn_top1": results[knn_key(k, t)],
        "knn_top1_init": knn_init,
        "knn": {"k": k, "t": t, "split": "test", "weights": "last epoch", "bank": "labelled train split"},
        "knn_top1_best_val": best.get("test/knn_top1") if best else None,
        "best_val_epoch": int(best["epoch"]) + 1 if best else None,
        "knn_top1_max_over_epochs_test_selected": max(test_by_epoch) if test_by_epoch else None,
        "epochs": epochs,
        "steps": steps,
        "method": cfg.method.name,
        "regularizer": cfg.regularizer.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.data.name,
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "world_size": int(trainer.world_size),
        "precision": precision,
        "eval_features": cfg.eval.features,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "output_dir": str(out),
        **{key: value for key, value in results.items() if key != knn_key(k, t)},
    }
    module.regularizer.on_train_end(out)
    title = f"{cfg.method.name} + {cfg.regularizer.name} | {cfg.backbone.name} | {cfg.data.name}"
    plot_curves(rows, out / "curves.png", title, knn_init=knn_init)
    write_summary(out / "summary.json", summary)
    return summary
