"""What ``metassl analyze`` looks at: a trained network rebuilt from a file, and its features
on the labelled splits, extracted once and cached as tensors.

A :class:`Source` is rebuilt from a training checkpoint (as ``metassl eval`` does, through
``metassl.engine.checkpoint.load_module``; ``eval.*`` / ``data.*`` / ``seed`` overrides) or from a
plain backbone ``state_dict`` (``metassl export`` output) with ``--backbone NAME`` and the data
options.  Its *feature spaces* (docs/analysis.md "Feature spaces"):

- ``backbone``: ``h``, the pooled backbone output; ``backbone_transformed``: the regularizer's
  evaluation transform of it (``Regularizer.eval_transform()``, e.g. MetaMask's ``h ⊙ m``,
  docs/algorithms.md §7.3), when there is one;
- ``projector``: the method's projector on ``h``; ``projector_transformed``: on the transformed
  feature (what the projector sees in training), when both exist.

Every space is computed from one backbone pass per batch (:func:`metassl.eval.features.extract_features`
with a stacking transform).  Positive pairs for the alignment are two augmentations (the method's
training augmentation, seeded) of test images.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from metassl.data.utils import atomic_torch_save, try_load_cache
from metassl.errors import MetasslError
from metassl.eval.features import extract_features

__all__ = ["SPACES", "Source", "inspect_file", "load_source", "per_dimension_gate", "FeatureSet", "extract_feature_set"]

SPACES = ("backbone", "backbone_transformed", "projector", "projector_transformed")
_CACHE_VERSION = 1


@dataclass
class Source:
    """A network to analyse: the backbone, the regularizer's evaluation transform and the
    method's projector (either may be None), the labelled data and the run's identity."""

    backbone: nn.Module
    transform: nn.Module | None
    projector: nn.Module | None
    bundle: Any  # metassl.data.DataBundle
    info: dict[str, Any]
    cfg: dict[str, Any]  # plain resolved config (data, eval, seed, ...)
    feat_dim: int = 0
    run_dir: Path | None = None

    def spaces(self) -> list[str]:
        """The feature spaces this network has, in :data:`SPACES` order."""
        names = ["backbone"]
        if self.transform is not None:
            names.append("backbone_transformed")
        if self.projector is not None:
            names.append("projector")
            if self.transform is not None and self._transform_keeps_dim():
                names.append("projector_transformed")
        return names

    def evaluated_space(self) -> str:
        """The space the run's kNN evaluates (``eval.features``, docs/algorithms.md §7.3)."""
        transformed = self.cfg.get("eval", {}).get("features", "transformed") == "transformed"
        return "backbone_transformed" if transformed and self.transform is not None else "backbone"

    def _transform_keeps_dim(self) -> bool:
        with torch.no_grad():
            probe = torch.zeros(2, self.feat_dim, device=module_device(self.transform))
            return tuple(self.transform.eval()(probe).shape) == (2, self.feat_dim)


def inspect_file(path: str | Path) -> str:
    """``"checkpoint"`` (a metassl training checkpoint) or ``"state_dict"`` (a plain tensor
    dict, e.g. ``metassl export`` output); one-line :class:`MetasslError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MetasslError(f"checkpoint {str(path)!r} not found; pass --ckpt <run>/checkpoints/last.ckpt")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one line
        raise MetasslError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}); pass a metassl run's "
                           "checkpoints/last.ckpt, or a `metassl export` file with --backbone NAME") from None
    if isinstance(blob, dict) and "state_dict" in blob and isinstance(blob.get("hyper_parameters"), dict) \
            and "cfg" in blob["hyper_parameters"]:
        return "checkpoint"
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return "state_dict"
    raise MetasslError(f"{path} is not a metassl checkpoint (no saved config) nor a plain state_dict; pass a metassl "
                       "run's checkpoints/last.ckpt, or a `metassl export` file with --backbone NAME")


def _labelled_bundle(cfg, what: str):
    """The run's data with its SSL augmentation; one line when it has no labelled splits."""
    from metassl.data import augmentation_for, build_data
    from metassl.engine.train import check_eval_data

    check_eval_data(cfg.data)
    bundle = build_data(OmegaConf.to_container(cfg.data, resolve=True), augmentation=augmentation_for(cfg.method.name))
    if bundle.train_eval is None or bundle.test is None or bundle.num_classes < 2:
        raise MetasslError(f"metassl analyze needs labelled train and test splits, and {what} has none; for image "
                           "folders pass data.eval_train_dir=... data.test_dir=... (one subfolder per class)")
    return bundle


def _from_checkpoint(path: Path, overrides: Iterable[str]) -> Source:
    from metassl.data import default_data_config
    from metassl.engine.checkpoint import _apply_overrides, load_module

    module = load_module(path)
    plain = copy.deepcopy(module.cfg)
    plain["data"] = {**default_data_config(plain["data"]["name"]), **plain["data"]}  # keys newer than the run
    cfg = _apply_overrides(plain, overrides)
    bundle = _labelled_bundle(cfg, f"{path} (data={cfg.data.name})")
    method = module.method
    info = {"checkpoint": str(path), "kind": "checkpoint", "method": cfg.method.name, "regularizer": cfg.regularizer.name,
            "backbone": cfg.backbone.name, "dataset": cfg.data.name, "eval_features": cfg.eval.features}
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return Source(method.backbone, module.regularizer.eval_transform(), getattr(method, "projector", None), bundle,
                  info, OmegaConf.to_container(cfg, resolve=True), int(method.feat_dim), run_dir)


_STATE_DICT_OVERRIDES = ("data", "data.", "eval.", "seed", "backbone.", "method")


def _from_state_dict(path: Path, backbone_name: str, overrides: Iterable[str]) -> Source:
    from metassl.config import load_config
    from metassl.models.backbones import build_backbone

    overrides = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith(_STATE_DICT_OVERRIDES):
            raise MetasslError(f"override {key!r}: with --backbone only data=..., data.*, eval.*, seed, backbone.* and "
                               "method=... (its augmentation makes the positive pairs) apply")
    presets = ("convnet_small", "resnet18", "resnet50")
    chosen = f"backbone={backbone_name}" if backbone_name in presets else f"backbone.name={backbone_name}"
    cfg = load_config([chosen, *overrides])
    bundle = _labelled_bundle(cfg, f"data={cfg.data.name}")
    bcfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    if bcfg.get("cifar_stem") is None:
        bcfg["cifar_stem"] = bundle.image_size <= 64  # as metassl train decides it
    try:
        backbone, feat_dim = build_backbone(**bcfg)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise MetasslError(f"--backbone {backbone_name!r}: {str(err).splitlines()[0]}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).splitlines()[0])
        raise MetasslError(f"{path} does not fit backbone {backbone_name!r} ({detail[:160]}); pass the --backbone the run "
                           "was trained with (metassl export prints it) and backbone.cifar_stem=true|false as in training") from None
    info = {"checkpoint": str(path), "kind": "exported backbone", "method": None, "regularizer": None,
            "backbone": backbone_name, "dataset": cfg.data.name, "eval_features": "raw"}
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["eval"]["features"] = "raw"
    return Source(backbone.eval(), None, None, bundle, info, plain, int(feat_dim), path.parent)


def load_source(path: str | Path, overrides: Iterable[str] = (), backbone: str | None = None) -> Source:
    """Rebuild what ``path`` holds (module docstring); one-line errors for a missing or foreign
    file and for a file that does not match ``backbone``."""
    path = Path(path)
    kind = inspect_file(path)
    if kind == "checkpoint":
        if backbone is not None:
            raise MetasslError(f"{path} is a training checkpoint, which knows its backbone; drop --backbone")
        return _from_checkpoint(path, overrides)
    if backbone is None:
        raise MetasslError(f"{path} is a plain state_dict (metassl export output); pass --backbone NAME (e.g. resnet18) "
                           "and the data options (data=cifar10 data.root=PATH)")
    return _from_state_dict(path, backbone, overrides)


def module_device(module: nn.Module) -> torch.device:
    """Where the module's first parameter or buffer lives (CPU for a module without any)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def per_dimension_gate(transform: nn.Module | None, dim: int, tol: float = 1e-6) -> torch.Tensor | None:
    """The vector ``m`` when ``transform(h) == h ⊙ m`` for every ``h`` (a per-dimension gate
    such as MetaMask's mask), found by probing the transform with the identity; else None."""
    if transform is None:
        return None
    transform = transform.eval()
    eye = torch.eye(dim, device=module_device(transform))
    try:
        out, twice, zero = transform(eye), transform(2 * eye), transform(torch.zeros(1, dim, device=eye.device))
    except Exception:  # noqa: BLE001 - a transform that cannot take the probe is no gate
        return None
    out, twice, zero = out.cpu(), twice.cpu(), zero.cpu()
    if out.shape != (dim, dim) or zero.abs().max() > tol:
        return None
    diag = out.diagonal().clone()
    scale = max(1.0, float(diag.abs().max()))
    if (out - torch.diag(diag)).abs().max() > tol * scale or (twice - 2 * out).abs().max() > tol * scale:
        return None
    return diag.float()


class _Spaces(nn.Module):
    """``h ↦ [h, T(h), g(h), g(T(h))]`` (the spaces asked for, concatenated)."""

    def __init__(self, names: list[str], transform: nn.Module | None, projector: nn.Module | None) -> None:
        super().__init__()
        self.names = list(names)
        self.transform, self.projector = transform, projector

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.flatten(1)
        th = self.transform(h) if self.transform is not None else None
        parts = {"backbone": lambda: h, "backbone_transformed": lambda: th,
                 "projector": lambda: self.projector(h), "projector_transformed": lambda: self.projector(th)}
        return torch.cat([parts[name]().flatten(1).float() for name in self.names], 1)


@dataclass
class FeatureSet:
    """Features of every split by space: ``splits[split][space]`` (N, D) float32, and
    ``labels[split]`` (N,); ``backgrounds[split]`` for the built-in data; ``pairs[space]`` =
    (2, P, D): two augmentations of P test images."""

    splits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    backgrounds: dict[str, torch.Tensor] = field(default_factory=dict)
    pairs: dict[str, torch.Tensor] = field(default_factory=dict)
    cached: bool = False


def _split_spaces(stacked: torch.Tensor, names: list[str], widths: list[int]) -> dict[str, torch.Tensor]:
    return dict(zip(names, torch.split(stacked, widths, dim=1)))


def _pair_batches(dataset, n: int, batch_size: int, seed: int):
    """``(views, index)`` batches of two seeded augmentations of ``n`` images of ``dataset``;
    index ``i`` for the first view of image ``i``, ``n + i`` for the second."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = DataLoader(dataset.subset(list(range(n))), batch_size=batch_size, shuffle=False, num_workers=0)
        start = 0
        for batch in loader:
            views = batch[0]
            b = views[0].shape[0]
            idx = torch.arange(start, start + b)
            yield torch.cat([views[0], views[1]]), torch.cat([idx, idx + n])
            start += b


def weights_fingerprint(*modules: nn.Module | None) -> str:
    """A hash of every parameter and buffer: the cache is reused only for the same weights."""
    digest = hashlib.sha1()
    for module in modules:
        if module is None:
            continue
        for name, value in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                          if value.numel() else b"")
    return digest.hexdigest()


def resolve_extraction_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``fp32`` or ``bf16``; ``auto`` is bf16 where the device computes it natively (CPUs with
    AVX512-BF16/AMX/Arm BF16, CUDA GPUs from Ampere on), as ``trainer.precision=auto`` chooses."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    from metassl.engine.precision import resolve_precision

    accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
    return "bf16" if resolve_precision("auto", accelerator).startswith("bf16") else "fp32"


def extract_feature_set(
    source: Source,
    cache_path: Path | None,
    *,
    foreground_test=None,
    num_pairs: int = 1000,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    precision: str = "auto",
) -> FeatureSet:
    """Features of the labelled train split, the test split, ``foreground_test`` (the test
    images with their background filled, when given) and the positive pairs; read from
    ``cache_path`` when it holds them for the same weights, data and options, else extracted
    and written there.  ``precision="bf16"`` (``auto`` where the device has native bf16,
    :func:`resolve_extraction_precision`) runs the forward passes under bf16 autocast with
    channels-last activations (about 2-3x faster on CPUs with bf16 units; features are returned
    in float32 either way)."""
    from metassl.data.utils import cache_key

    precision = resolve_extraction_precision(precision, device)
    autocast = torch.bfloat16 if precision == "bf16" else None

    names = source.spaces()
    key = cache_key({"v": _CACHE_VERSION, "weights": weights_fingerprint(source.backbone, source.transform, source.projector),
                     "data": source.cfg["data"], "spaces": names, "pairs": int(num_pairs), "seed": int(seed),
                     "foreground": foreground_test is not None, "precision": precision})
    if cache_path is not None and cache_path.is_file():
        blob = try_load_cache(cache_path)
        if isinstance(blob, dict) and blob.get("key") == key:
            return FeatureSet(blob["splits"], blob["labels"], blob["backgrounds"], blob["pairs"], cached=True)
    device = torch.device(device)
    stack = _Spaces(names, source.transform, source.projector).to(device)
    backbone = source.backbone.to(device)
    if autocast is not None:
        backbone = backbone.to(memory_format=torch.channels_last)
    first = source.bundle.test[0][0]
    widths = [int(_Spaces([n], source.transform, source.projector).to(device).eval()(
        backbone.eval()(first[None].to(device))).shape[1]) for n in names]
    fs = FeatureSet()
    datasets = {"train": source.bundle.train_eval, "test": source.bundle.test}
    if foreground_test is not None:
        datasets["test_foreground"] = foreground_test
    for split, dataset in datasets.items():
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        stacked, labels = extract_features(backbone, loader, stack, device=device, out_device="cpu",
                                           autocast_dtype=autocast, channels_last=autocast is not None)
        fs.splits[split] = _split_spaces(stacked, names, widths)
        fs.labels[split] = labels
        if getattr(dataset, "backgrounds", None) is not None:
            fs.backgrounds[split] = torch.as_tensor(dataset.backgrounds).long()
    ssl_transform = getattr(source.bundle.train_ssl, "transform", None)
    n_pairs = min(int(num_pairs), len(source.bundle.test))
    if n_pairs >= 2 and ssl_transform is not None and hasattr(source.bundle.test, "with_transform"):
        paired = source.bundle.test.with_transform(ssl_transform, return_mask=False)
        stacked, index = extract_features(backbone, _pair_batches(paired, n_pairs, batch_size, seed), stack,
                                          device=device, out_device="cpu", autocast_dtype=autocast,
                                          channels_last=autocast is not None)
        ordered = torch.empty_like(stacked)
        ordered[index] = stacked
        fs.pairs = {name: feats.reshape(2, n_pairs, -1) for name, feats in _split_spaces(ordered, names, widths).items()}
    if cache_path is not None:
        atomic_torch_save({"key": key, "splits": fs.splits, "labels": fs.labels, "backgrounds": fs.backgrounds,
                           "pairs": fs.pairs}, cache_path)
    return fs
