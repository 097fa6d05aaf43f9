"""The LightningModule: one manual-optimization code path for every method and regularizer."""

from __future__ import annotations

import math
import time

from typing import Any, Mapping

import lightning as L
import torch
from torch import nn

from metassl.engine.data_order import ResumableSampler, batch_seed, capture_rng, restore_rng
from metassl.engine.evaluation import label_free_metrics, training_dataset
from metassl.engine.faults import NonFinitePolicy
from metassl.engine.optim import build_optimizer, lr_lambda
from metassl.engine.step import clip_info, training_step
from metassl.eval.knn import knn_accuracy
from metassl.losses.distributed import is_distributed
from metassl.methods import build_method
from metassl.models.backbones import build_backbone
from metassl.regularizers import build_regularizer


def _kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "name"}


def batch_extras(batch) -> dict[str, torch.Tensor]:
    """The extra fields of a training batch ``(views, labels, extra)`` by name: a dict as the
    data pipeline gives it, or a bare tensor (the built-in data's foreground masks) as ``mask``."""
    if len(batch) < 3 or batch[2] is None:
        return {}
    extra = batch[2]
    return dict(extra) if isinstance(extra, Mapping) else {"mask": extra}


class SSLModule(L.LightningModule):
    """Base method + regularizer, trained with manual optimization.

    ``cfg`` is the resolved configuration as a plain dict (it is saved in every checkpoint,
    so ``SSLModule.load_from_checkpoint(path)`` rebuilds the model without the CLI).
    Validation runs the kNN monitor: dataloader 0 is the labelled train split (the bank,
    with a held-out validation part), dataloader 1 the test split.
    """

    def __init__(self, cfg: dict[str, Any], num_classes: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": cfg, "num_classes": num_classes})
        self.cfg = cfg
        self.automatic_optimization = False
        backbone, feat_dim = build_backbone(**cfg["backbone"])
        self.method = build_method(cfg["method"]["name"], backbone, feat_dim, **_kwargs(cfg["method"]))
        self.regularizer = build_regularizer(cfg["regularizer"]["name"], self.method, **_kwargs(cfg["regularizer"]))
        self.num_classes = int(num_classes)
        self.knn_val_mask: torch.Tensor | None = None  # True where a bank sample is held out for validation
        self._val_feats: list[list[torch.Tensor]] = [[], []]
        self._val_labels: list[list[torch.Tensor]] = [[], []]
        self._val_index: list[list[torch.Tensor]] = [[], []]
        opt = cfg["optimizer"]
        self.nonfinite = NonFinitePolicy(
            int(cfg["trainer"].get("skip_nonfinite_steps", 0)), method=cfg["method"]["name"],
            regularizer=cfg["regularizer"]["name"],
            hint=(f"with optimizer.name={opt['name']} at optimizer.lr={opt['lr']}, lower optimizer.lr, set "
                  "trainer.gradient_clip_val (e.g. 5) or use optimizer.name=lars (trainer.skip_nonfinite_steps=N skips "
                  "up to N such steps); "),
        )
        self.train_sampler: ResumableSampler | None = None  # set by the engine: its position goes in checkpoints
        self._pending_rng: dict[str, Any] | None = None  # random state of a loaded checkpoint, set at the next batch
        # data.augment_on=device (set by the engine): the views of each uint8 batch, made on its device
        self.batch_views: Any = None
        self.batch_clean: Any = None
        self._throughput: list[float] = [0.0, 0.0, 0.0]  # epoch start, last batch end, images this epoch
        # training seconds of earlier processes of this run (from the checkpoint resumed) and this fit's start
        self.seconds_before_resume = 0.0
        self._fit_clock: float | None = None

    # -- features --------------------------------------------------------------------------
    def eval_transform(self) -> nn.Module | None:
        if self.cfg["eval"]["features"] == "raw":
            return None
        return self.regularizer.eval_transform()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.method.backbone(x).flatten(1)
        transform = self.eval_transform()
        return transform(h) if transform is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    # -- optimization ----------------------------------------------------------------------
    def _global_batch(self) -> int:
        world = self.trainer.world_size if self._trainer is not None else 1
        return int(self.cfg["batch_size"]) * max(1, world)

    def configure_optimizers(self):
        opt_cfg, sched_cfg = self.cfg["optimizer"], self.cfg["scheduler"]
        lr = float(opt_cfg["lr"])
        if opt_cfg["scale_lr"]:
            lr = lr * self._global_batch() / 256
        named = list(self.method.named_trainable_parameters()) + [
            (f"regularizer.{n}", p) for n, p in self.regularizer.named_encoder_parameters()
        ]
        encoder_opt = build_optimizer(opt_cfg, named, lr)
        total = int(self.trainer.estimated_stepping_batches)
        self.total_steps = max(1, total)
        # batches per epoch (set up by estimated_stepping_batches); not total // max_epochs, which
        # is wrong when max_steps ends training early (the warm-up would shrink to a few steps)
        per_epoch = float(getattr(self.trainer, "num_training_batches", float("inf")))
        steps_per_epoch = max(1, int(per_epoch) if math.isfinite(per_epoch) else total // max(1, int(self.trainer.max_epochs or 1)))
        warmup = 0 if sched_cfg["name"] == "cosine" else int(sched_cfg["warmup_epochs"] * steps_per_epoch)
        milestones = [int(e * steps_per_epoch) for e in sched_cfg.get("milestones") or ()]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            encoder_opt,
            lr_lambda(sched_cfg["name"], total, warmup, sched_cfg["min_lr_ratio"], milestones, sched_cfg.get("decay", 0.1)),
        )
        optimizers, schedulers = [encoder_opt], [schedule]
        if self.regularizer.bilevel:
            meta = self.regularizer.configure_meta_optimizer(total)
            if meta is None:
                raise RuntimeError(f"regularizer {self.regularizer.name!r} is bilevel but returned no meta optimizer")
            meta_opt, meta_sched = meta
            optimizers.append(meta_opt)
            if meta_sched is not None:
                schedulers.append(meta_sched)
        return optimizers, schedulers

    def on_fit_start(self) -> None:
        self._fit_clock = time.perf_counter()
        if self.cfg["trainer"]["channels_last"]:
            self.method.to(memory_format=torch.channels_last)

    def _views_on_device(self, images: Any, batch_idx: int, extras: dict[str, torch.Tensor]):
        """``data.augment_on=device``: the views (and ``extras["clean"]``) of the whole uint8 batch,
        drawn from a generator seeded by (seed, rank, epoch, batch)."""
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            raise RuntimeError("data.augment_on=device expects uint8 image batches from the training loader; got "
                               f"{type(images).__name__} (build the data with metassl.data.build_data)")
        generator = torch.Generator().manual_seed(
            batch_seed(int(self.cfg.get("seed", 0)), self.global_rank, self.current_epoch, batch_idx))
        views = self.batch_views(images, generator)
        if self.batch_clean is not None:
            extras = {**extras, "clean": self.batch_clean(images)}
        return views, extras

    def training_step(self, batch, batch_idx):
        views, labels = batch[0], batch[1]
        extras = batch_extras(batch)
        if self.batch_views is not None:
            views, extras = self._views_on_device(views, batch_idx, extras)
        if self.cfg["trainer"]["channels_last"]:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        encoder_opt = optimizers[0]
        meta_opt = optimizers[1].optimizer if len(optimizers) > 1 else None
        clip = self.cfg["trainer"]["gradient_clip_val"]

        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scaled = scaler is not None and scaler.is_enabled()

        def backward(loss: torch.Tensor):
            # clip right after backward, so regularizers reading .grad before the step see
            # exactly the gradient the optimizer will use (Lightning unscales 16-mixed grads
            # before clipping, so the loss scale no longer applies then); the norm before
            # clipping goes to the regularizers (exact meta-gradients through the clip)
            self.manual_backward(loss)
            if not clip:
                return None
            info = clip_info(encoder_opt.optimizer, float(clip), float(scaler.get_scale()) if scaled else None)
            self.clip_gradients(encoder_opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            return info

        grad_scale = None
        if scaled and not clip:
            grad_scale = lambda: float(scaler.get_scale())  # noqa: E731
        progress = min(1.0, self.global_step / max(1, getattr(self, "total_steps", 1)))
        logs = training_step(
            self.method,
            self.regularizer,
            views,
            labels,
            encoder_opt.optimizer,
            meta_opt,
            extras=extras,
            progress=progress,
            global_step=self.global_step,
            backward=backward,
            step_encoder=encoder_opt.step,
            grad_scale=grad_scale,
            distributed=is_distributed(),
            nonfinite=self.nonfinite,
        )
        if "loss" not in logs:  # a non-finite step skipped (trainer.skip_nonfinite_steps): nothing was updated
            self.log("train/skipped_nonfinite", float(self.nonfinite.skipped), batch_size=views[0].shape[0])
            return
        schedulers = self.lr_schedulers()
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            sched.step()
        logs["lr"] = encoder_opt.optimizer.param_groups[0]["lr"]
        batch_size = views[0].shape[0]
        # losses are averaged over ranks (per-rank values of NT-Xent, MoCo, BYOL, SimSiam are local means)
        self.log("train/loss", logs.pop("loss"), prog_bar=True, batch_size=batch_size, sync_dist=True)
        losses = {f"train/{k}": v for k, v in logs.items() if k.startswith("loss_")}
        self.log_dict(losses, batch_size=batch_size, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if not k.startswith("loss_")}, batch_size=batch_size)

    # -- checkpoint state Lightning does not keep -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Random generators, the sampler's place in its epoch, the skipped-step count and the training
        seconds so far (so a resumed run reports the time of the whole run, not of its last process)."""
        state: dict[str, Any] = {"rng": capture_rng(), "nonfinite": self.nonfinite.state_dict(),
                                 "train_seconds": self.train_seconds()}
        if self.train_sampler is not None and self._trainer is not None:
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["sampler"] = self.train_sampler.state_dict(done)
        checkpoint["metassl"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("metassl")
        if not state:  # a checkpoint older than this state: weights and optimizers only
            return
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        self.seconds_before_resume = float(state.get("train_seconds", 0.0))
        self._pending_rng = state.get("rng")
        if self.train_sampler is not None and "sampler" in state:
            self.train_sampler.load_state_dict(state["sampler"])

    def train_seconds(self) -> float:
        """Seconds of training behind the current weights: those of the processes before the checkpoint
        this run resumed from, plus this fit's so far (time lost after an interruption's last
        checkpoint is not counted: those steps are trained again)."""
        return self.seconds_before_resume + (time.perf_counter() - self._fit_clock if self._fit_clock else 0.0)

    def on_train_start(self) -> None:  # resumed mid-epoch, Lightning skips on_train_epoch_start: time from here
        self._throughput = [time.perf_counter(), 0.0, 0.0]

    def on_train_epoch_start(self) -> None:
        self._throughput = [time.perf_counter(), 0.0, 0.0]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch[0], torch.Tensor) else batch[0][0]
        self._throughput[1] = time.perf_counter()
        self._throughput[2] += images.shape[0] * self.trainer.world_size

    def on_train_epoch_end(self) -> None:
        """``train/images_per_s``: training images (all ranks) per second of this epoch, end to end
        (data loading and augmentation included, the validation kNN after the last batch not)."""
        start, end, images = self._throughput
        if images and end > start:
            self.log("train/images_per_s", images / (end - start), on_step=False, on_epoch=True)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:  # after restoring: the generators as they were when the checkpoint was taken
            restore_rng(self._pending_rng)
            self._pending_rng = None

    # -- kNN monitor -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_feats, self._val_labels, self._val_index = [[], []], [[], []], [[], []]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch[0], batch[1]
        if self.cfg["trainer"]["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.features(x).float()
        self._val_feats[dataloader_idx].append(feats)
        self._val_labels[dataloader_idx].append(y)
        self._val_index[dataloader_idx].append(batch[2])

    def _gathered(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, labels and dataset indices of loader ``i`` from all ranks, each sample once
        (the distributed sampler pads ranks with repeated samples)."""
        parts = [torch.cat(p) for p in (self._val_feats[i], self._val_labels[i], self._val_index[i])]
        if self.trainer.world_size > 1:
            parts = [self.all_gather(p).flatten(0, 1) for p in parts]
            index = parts[2]
            order = torch.argsort(index, stable=True)
            sorted_index = index[order]
            first = torch.ones_like(sorted_index, dtype=torch.bool)
            first[1:] = sorted_index[1:] != sorted_index[:-1]
            keep = order[first]
            parts = [p[keep] for p in parts]
        return parts[0], parts[1], parts[2]

    def on_validation_epoch_end(self) -> None:
        if not self._val_feats[0] or not self._val_feats[1]:
            return
        bank, bank_y, index = self._gathered(0)
        test, test_y, _ = self._gathered(1)
        k, t = int(self.cfg["eval"]["knn"]["k"]), float(self.cfg["eval"]["knn"]["t"])
        metrics = {"test/knn_top1": knn_accuracy(bank, bank_y, test, test_y, self.num_classes, k=k, t=t)}
        if self.knn_val_mask is not None:
            held_out = self.knn_val_mask.to(index.device)[index]
            metrics["val/knn_top1"] = knn_accuracy(
                bank[~held_out], bank_y[~held_out], bank[held_out], bank_y[held_out], self.num_classes, k=k, t=t
            )
        val_feats = bank[self.knn_val_mask.to(index.device)[index]] if self.knn_val_mask is not None else bank
        metrics.update(label_free_metrics(val_feats, self.features, training_dataset(self.trainer), seed=int(self.cfg["seed"])))
        self.log_dict(metrics, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self._val_feats, self._val_labels, self._val_index = [[], []], [[], []], [[], []]
