"""Configuration: YAML presets composed by group (Hydra) plus ``key=value`` overrides.

``load_config(["method=byol", "trainer.max_epochs=100"])`` composes
``configs/config.yaml`` with the chosen group presets and validates the result *before*
anything is trained: unknown keys, unknown presets and values of the wrong type or outside
their choices raise :class:`ConfigError` with one line that names the fix.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from metassl.errors import ConfigError

GROUPS = ("method", "regularizer", "data", "backbone", "protocol", "paper")

CHOICES: dict[str, tuple] = {
    "optimizer.name": ("sgd", "lars", "adamw"),
    "scheduler.name": ("warmup_cosine", "cosine", "constant", "multistep"),
    "trainer.precision": ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    "eval.features": ("transformed", "raw"),
    "eval.segment.head": ("linear", "conv"),
}
POSITIVE = ("batch_size", "optimizer.lr", "trainer.max_epochs", "eval.batch_size", "eval.knn.k", "eval.knn.t",
            "eval.segment.epochs", "eval.segment.lr", "eval.segment.batch_size", "eval.segment.hidden_dim",
            "trainer.log_every_n_steps", "trainer.num_nodes", "eval.knn.every_n_epochs", "eval.linear.epochs",
            "eval.linear.lr", "eval.linear.batch_size")
NON_NEGATIVE = ("trainer.checkpoint_every_n_steps", "trainer.skip_nonfinite_steps", "optimizer.weight_decay",
                "optimizer.momentum", "eval.linear.weight_decay", "scheduler.warmup_epochs", "scheduler.min_lr_ratio")


def _configs_dir() -> Path:
    return Path(str(resources.files("metassl") / "configs"))


def available_presets(group: str) -> list[str]:
    """Names of the YAML presets of a group (``method``, ``data``, ...)."""
    folder = _configs_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _reference() -> DictConfig:
    ref = OmegaConf.load(_configs_dir() / "config.yaml")
    ref.pop("defaults", None)
    return ref


def _condense_hydra_error(err: Exception) -> str:
    text = str(err).strip()
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m:
        group, name = m.group(1).split("/")[-1], m.group(2)
        return f"unknown {group} preset {name!r}; available: {', '.join(available_presets(group))}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        return _unknown_key_message(m.group(1))
    return text.splitlines()[0]


def _flat_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            value = cfg[key]
            full = f"{prefix}{key}"
            if isinstance(value, DictConfig):
                out.update(_flat_keys(value, full + "."))
            else:
                out[full] = value
    return out


def _unknown_key_message(key: str, known: Iterable[str] | None = None) -> str:
    from metassl.data.config import MASK_KEYS

    if key.startswith("data.") and key[5:] in MASK_KEYS:
        return f"{key} needs per-pixel foreground masks, which only data=builtin has; remove it or train on data=builtin"
    known = list(known) if known is not None else list(_flat_keys(_reference()))
    hint = difflib.get_close_matches(key, known, n=1)
    suffix = f"; did you mean {hint[0]!r}?" if hint else "; see `metassl config` for all keys"
    return f"unknown config key {key!r}{suffix}"


def _check_types(cfg: DictConfig) -> None:
    ref = _flat_keys(_reference())
    got = _flat_keys(OmegaConf.masked_copy(cfg, [k for k in _reference().keys()]))
    for key, value in got.items():
        if key not in ref:
            raise ConfigError(_unknown_key_message(key, ref))
        expected = ref[key]
        if isinstance(expected, (list, ListConfig)) and value is not None and not isinstance(value, (list, ListConfig)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[] or {key}=[[20,0.07]]"
                              if key == "eval.knn_extra" else f"{key}={value!r} must be a list, e.g. {key}=[]")
        if expected is None or value is None or isinstance(expected, (list, ListConfig)):
            continue
        if isinstance(expected, bool):
            ok = isinstance(value, bool)
        elif isinstance(expected, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(expected, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # strings: several keys accept a number as well (e.g. num_workers=auto|4, precision=32)
            ok = isinstance(value, (str, int))
        if not ok:
            raise ConfigError(f"{key}={value!r} has the wrong type: expected {type(expected).__name__} like {expected!r}")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value) not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
    for key in NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value!r} must be >= 0")
    if cfg.trainer.max_steps != -1 and cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps!r} must be -1 (no limit) or > 0")
    clip = cfg.trainer.gradient_clip_val
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r} must be null (no clipping) or a number > 0")
    limit = cfg.trainer.limit_train_batches
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ConfigError(f"trainer.limit_train_batches={limit!r} must be a fraction in (0, 1] or a number of batches >= 1")
    if isinstance(limit, float) and limit > 1.0:
        raise ConfigError(f"trainer.limit_train_batches={limit!r}: a float is a fraction of the epoch, in (0, 1]")
    if not 0.0 <= cfg.eval.val_fraction < 1.0:
        raise ConfigError(f"eval.val_fraction={cfg.eval.val_fraction!r} must be in [0, 1)")
    for pair in cfg.eval.knn_extra:
        if not (isinstance(pair, (list, ListConfig)) and len(pair) == 2):
            raise ConfigError(f"eval.knn_extra entries must be [k, t] pairs, got {pair!r}")
    workers = cfg.num_workers
    if not (workers == "auto" or (isinstance(workers, int) and workers >= 0)):
        raise ConfigError(f"num_workers={workers!r} must be `auto` or an integer >= 0")


def backbone_keys(name: str) -> set[str] | None:
    """The keys a ``backbone`` section may set for backbone ``name``: ``build_backbone``'s own plus
    the model constructor's keywords (``ConvNetSmall``; the torchvision builder and model class);
    None where anything goes (``timm:`` models, constructors taking ``**kwargs``)."""
    from metassl.signatures import keyword_parameters
    from metassl.models.backbones import BACKBONE_NAMES, ConvNetSmall, build_backbone

    own = set(keyword_parameters(build_backbone))
    if name == "convnet_small":
        return own | set(keyword_parameters(ConvNetSmall.__init__, skip=("self",)))
    if name.startswith("timm:"):
        return None
    arch = name[3:] if name.startswith("tv:") else name if name in ("resnet18", "resnet50") else None
    if arch is None:
        raise ConfigError(f"unknown backbone {name!r}; options: {', '.join(BACKBONE_NAMES)}")
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"unknown torchvision classification model {arch!r} in backbone.name={name!r}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    builder = torchvision.models.get_model_builder(arch)
    try:  # the builders are annotated with their model class (``-> ResNet``)
        cls = typing.get_type_hints(builder).get("return")
    except (NameError, TypeError):
        cls = None
    if not inspect.isclass(cls):
        return None
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = {p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL}
    return own | named | set(keyword_parameters(builder, skip=("weights",)))


def _check_backbone(cfg: DictConfig) -> None:
    name = str(cfg.backbone.name)
    valid = backbone_keys(name)
    if valid is None:
        return
    unknown = sorted(set(cfg.backbone.keys()) - valid - {"name"})
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(key, sorted(valid), n=1)
        suffix = f"did you mean 'backbone.{hint[0]}'?" if hint else f"backbone {name} accepts: {', '.join(sorted(valid - {'name'}))}"
        raise ConfigError(f"unknown config key 'backbone.{key}' for backbone {name}; {suffix}")


def _check_groups(cfg: DictConfig) -> None:
    """Group sections are validated against their builders' signatures."""
    from metassl.data import validate_data_config
    from metassl.errors import DataError
    from metassl.methods import METHODS
    from metassl.methods.base import method_hparams
    from metassl.regularizers import REGULARIZERS
    from metassl.regularizers.base import check_regularizer, regularizer_hparams

    def check(section: str, valid: Iterable[str]) -> None:
        valid = set(valid) | {"name"}
        unknown = sorted(set(cfg[section].keys()) - valid)
        if unknown:
            raise ConfigError(_unknown_key_message(f"{section}.{unknown[0]}", [f"{section}.{k}" for k in sorted(valid)]))

    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    check("method", method_hparams(name))
    name = cfg.regularizer.name
    if name not in REGULARIZERS:
        raise ConfigError(f"unknown regularizer {name!r}; available: {', '.join(sorted(REGULARIZERS))}")
    check("regularizer", regularizer_hparams(name))
    try:  # the regularizer's own word on the base method (supports()), one line
        check_regularizer(name, cfg.method.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_backbone(cfg)
    try:
        validate_data_config(OmegaConf.to_container(cfg.data, resolve=True))
    except DataError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: DictConfig) -> DictConfig:
    """Raise :class:`ConfigError` on the first problem; return ``cfg`` unchanged otherwise."""
    known = set(_reference().keys()) | {"method", "regularizer", "data", "backbone"}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(_unknown_key_message(str(key), sorted(known)))
    for section in ("method", "regularizer", "data", "backbone"):
        if not isinstance(cfg.get(section), DictConfig) or "name" not in cfg[section]:
            raise ConfigError(f"config section {section!r} needs a `name`; choose a preset with {section}=<name>")
    _check_types(cfg)
    _check_groups(cfg)
    return cfg


def load_config(overrides: Iterable[str] = (), extra_files: Iterable[str | Path] = ()) -> DictConfig:
    """Compose presets + overrides (+ optional user YAML files merged on top) and validate."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # backbone constructor keywords (backbone.widths=[...]) are not in the presets: `++` adds or
    # overrides them; validation then checks them against the builder's signature
    overrides = list(overrides)
    for item in overrides:
        if not re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.\-/@]*=.*", item, flags=re.DOTALL):
            raise ConfigError(f"override {item!r} is not key=value with a config key (e.g. trainer.max_epochs=10); "
                              "see `metassl config` for all keys")
    overrides = [f"++{o}" if o.startswith("backbone.") else o for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("metassl.configs", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_condense_hydra_error(err)) from None
    except (ValueError, TypeError) as err:  # Hydra's own checks on an override's shape
        raise ConfigError(f"invalid override: {' '.join(str(err).split())}") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    for path in extra_files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    cfg = validate(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
