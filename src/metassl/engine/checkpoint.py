"""Loading metassl checkpoints for offline evaluation and export."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from metassl.config import load_config, validate
from metassl.data import augmentation_for, build_data
from metassl.data.utils import atomic_torch_save
from metassl.engine.ckpt_io import check_training_checkpoint
from metassl.engine.evaluation import evaluate_backbone
from metassl.engine.module import SSLModule
from metassl.engine.train import check_eval_data
from metassl.errors import ConfigError, MetasslError


def load_module(ckpt: str | Path) -> SSLModule:
    """Rebuild the trained :class:`SSLModule` (config read from the checkpoint) on the CPU."""
    path = Path(ckpt)
    check_training_checkpoint(path, f"--ckpt {path}")
    try:
        module = SSLModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
    except (KeyError, TypeError, RuntimeError) as err:
        raise MetasslError(f"{path} is not a metassl training checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return module.eval()


def _apply_overrides(cfg: dict[str, Any], overrides: Iterable[str]):
    conf = OmegaConf.create(cfg)
    OmegaConf.set_struct(conf, True)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0]
        if not key.startswith(("eval.", "data.", "seed")):
            raise ConfigError(f"override {key!r}: only eval.*, data.* and seed can change at evaluation time")
        try:
            conf.merge_with_dotlist([item])
        except Exception:
            raise ConfigError(f"unknown config key {key!r} for this checkpoint's configuration") from None
    return validate(conf)


def evaluate_checkpoint(ckpt: str | Path, protocol: str, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``metassl eval knn|linear|background|segment``: kNN (main + ``eval.knn_extra`` pairs), the linear probe,
    or both on full vs foreground-only images (:func:`_evaluate_background`), or the dense
    evaluation (:func:`_evaluate_segment`)."""
    module = load_module(ckpt)
    if protocol == "background":
        return _evaluate_background(ckpt, module, overrides)
    if protocol == "segment":
        return _evaluate_segment(ckpt, module, overrides)
    cfg = _apply_overrides(module.cfg, overrides)
    check_eval_data(cfg.data)
    bundle = build_data(OmegaConf.to_container(cfg.data, resolve=True), augmentation=augmentation_for(cfg.method.name))
    module.cfg = OmegaConf.to_container(cfg, resolve=True)
    pairs = [(int(cfg.eval.knn.k), float(cfg.eval.knn.t))] + [tuple(p) for p in cfg.eval.knn_extra]
    results = evaluate_backbone(
        module.method.backbone,
        module.eval_transform(),
        bundle,
        knn_pairs=pairs if protocol == "knn" else [],
        linear=OmegaConf.to_container(cfg.eval.linear) if protocol == "linear" else None,
        val_fraction=float(cfg.eval.val_fraction),
        batch_size=int(cfg.eval.batch_size),
        seed=int(cfg.seed),
    )
    results.update(
        checkpoint=str(ckpt),
        dataset=cfg.data.name,
        method=cfg.method.name,
        regularizer=cfg.regularizer.name,
        backbone=cfg.backbone.name,
        eval_features=cfg.eval.features,
    )
    return results


def _evaluate_background(ckpt: str | Path, module: SSLModule, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``metassl eval background`` (docs/algorithms.md §5.6): the run's kNN and (``eval.background.linear``)
    the linear probe on full vs foreground-only built-in images, bank and probe split in the test's
    condition; ``{full, foreground, gap}`` plus the run's identity."""
    from metassl.data.builtin import resolve_fill
    from metassl.eval.background import evaluate_background

    plain = copy.deepcopy(module.cfg)
    name = plain["data"]["name"]
    if name != "builtin":
        raise MetasslError(
            f"metassl eval background needs a run on data=builtin, the only data with foreground masks; {ckpt} was "
            f"trained on data={name}: train with data=builtin (as benchmarks/background_study.py does)"
        )
    defaults = load_config()  # keys newer than the checkpoint get their defaults
    plain["eval"].setdefault("background", OmegaConf.to_container(defaults.eval.background))
    plain["data"] = {**OmegaConf.to_container(defaults.data), **plain["data"]}
    cfg = _apply_overrides(plain, overrides)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    bundle = build_data({**data, "foreground_only": False, "test_foreground_only": False},
                        augmentation=augmentation_for(cfg.method.name))
    fill = resolve_fill(data["foreground_fill"], image_size=data["image_size"], num_classes=data["num_classes"],
                        seed=data["seed"], background_contrast=data["background_contrast"], root=data["root"])
    splits = {"full": (bundle.train_eval, bundle.test),
              "foreground": (bundle.train_eval.with_background_filled(fill), bundle.test.with_background_filled(fill))}
    module.cfg = OmegaConf.to_container(cfg, resolve=True)
    k, t = int(cfg.eval.knn.k), float(cfg.eval.knn.t)
    report = evaluate_background(
        module.method.backbone, module.eval_transform(), splits, bundle.num_classes, k=k, t=t,
        linear=OmegaConf.to_container(cfg.eval.linear) if cfg.eval.background.linear else None,
        val_fraction=float(cfg.eval.val_fraction), batch_size=int(cfg.eval.batch_size), seed=int(cfg.seed),
    )
    report.update(
        checkpoint=str(ckpt), method=cfg.method.name, regularizer=cfg.regularizer.name, backbone=cfg.backbone.name,
        eval_features=cfg.eval.features, knn={"k": k, "t": t}, linear_selection="best validation epoch (val split of train)",
        fill=[int(v) for v in fill], trained_foreground_only=bool(data["foreground_only"]),
        background_class_correlation=data["background_class_correlation"],
        test_background_class_correlation=data["test_background_class_correlation"],
    )
    return report


def _evaluate_segment(ckpt: str | Path, module: SSLModule, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``metassl eval segment`` (docs/algorithms.md §7.4): a dense head on the frozen backbone's feature
    map, trained on the run's built-in masks or an image/mask folder (``eval.segment``)."""
    from metassl.data.segmentation import segmentation_splits
    from metassl.eval.segment import check_segmentation_options, evaluate_segmentation

    plain = copy.deepcopy(module.cfg)
    if "segment" not in plain["eval"]:  # a checkpoint older than eval.segment: its defaults
        plain["eval"]["segment"] = OmegaConf.to_container(load_config().eval.segment)
    cfg = _apply_overrides(plain, overrides)
    seg = OmegaConf.to_container(cfg.eval.segment, resolve=True)
    options = {key: seg[key] for key in ("head", "hidden_dim", "epochs", "lr", "weight_decay", "batch_size")}
    options["val_fraction"] = float(cfg.eval.val_fraction)
    try:
        check_segmentation_options(module.method.backbone, **options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    dataset = str(seg["dataset"])
    train_set, test_set, num_classes = segmentation_splits(
        dataset, OmegaConf.to_container(cfg.data, resolve=True), seg["image_size"], seg["num_classes"]
    )
    results = evaluate_segmentation(
        module.method.backbone, train_set, test_set, num_classes, **options, seed=int(cfg.seed),
        extract_batch_size=int(cfg.eval.batch_size),
    )
    results.update(
        checkpoint=str(ckpt), dataset=cfg.data.name if dataset == "run" else dataset, method=cfg.method.name,
        regularizer=cfg.regularizer.name, backbone=cfg.backbone.name, eval_features="raw (forward_features map)",
    )
    return results


def export_backbone(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone's plain ``state_dict`` (loads into the matching torchvision/timm model)."""
    module = load_module(ckpt)
    backbone = module.method.backbone
    backbone = getattr(backbone, "_orig_mod", backbone)  # unwrap torch.compile
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    out = Path(out)
    try:
        atomic_torch_save(state, out)
    except OSError as err:
        raise MetasslError(f"cannot write {out} ({err.strerror or err}); pass a writable --out path") from None
    bcfg = module.cfg["backbone"]
    name = bcfg["name"]
    if name in ("resnet18", "resnet50"):
        hint = f"load with torchvision.models.{name}(); model.fc = nn.Identity()"
        if bcfg.get("cifar_stem"):
            hint += "; model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity()"
    elif name.startswith("timm:"):
        hint = f"load with timm.create_model({name[5:]!r}, num_classes=0)"
    elif name.startswith("tv:"):
        hint = f"load with torchvision.models.get_model({name[3:]!r}) with its classifier set to nn.Identity()"
    else:
        hint = f"load with metassl.models.backbones.build_backbone({name!r})[0]"
    return {"num_tensors": len(state), "backbone": name, "load_hint": hint}
