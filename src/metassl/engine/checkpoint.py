"""Loading metassl checkpoints for offline evaluation and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import OmegaConf

from metassl.config import validate
from metassl.data import augmentation_for, build_data
from metassl.engine.evaluation import evaluate_backbone
from metassl.engine.module import SSLModule
from metassl.engine.train import check_eval_data
from metassl.errors import ConfigError, MetasslError


def load_module(ckpt: str | Path) -> SSLModule:
    """Rebuild the trained :class:`SSLModule` (config read from the checkpoint) on the CPU."""
    path = Path(ckpt)
    if not path.is_file():
        raise MetasslError(f"checkpoint {str(path)!r} not found; pass --ckpt <run>/checkpoints/last.ckpt")
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
    """``metassl eval knn|linear``: kNN (main + ``eval.knn_extra`` pairs) or the linear probe."""
    module = load_module(ckpt)
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


def export_backbone(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone's plain ``state_dict`` (loads into the matching torchvision/timm model)."""
    module = load_module(ckpt)
    backbone = module.method.backbone
    backbone = getattr(backbone, "_orig_mod", backbone)  # unwrap torch.compile
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
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
