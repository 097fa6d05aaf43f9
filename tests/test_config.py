"""Config composition and validation: presets, overrides, one-line errors."""

import pytest

from metassl.config import available_presets, load_config
from metassl.errors import ConfigError


def test_default_composition():
    cfg = load_config([])
    assert cfg.method.name == "simclr"
    assert cfg.regularizer.name == "none"
    assert cfg.data.name == "builtin"
    assert cfg.backbone.name == "convnet_small"


def test_group_and_value_overrides():
    cfg = load_config(["method=byol", "backbone=resnet18", "trainer.max_epochs=7", "data=cifar10", "data.root=/x"])
    assert cfg.method.name == "byol" and cfg.backbone.name == "resnet18"
    assert cfg.trainer.max_epochs == 7 and cfg.data.root == "/x"


def test_every_preset_composes():
    for group in ("method", "regularizer", "data", "backbone", "protocol"):
        for name in available_presets(group):
            load_config([f"{group}={name}"])


def test_smoke_protocol_sets_tiny_run():
    cfg = load_config(["protocol=smoke"])
    assert cfg.trainer.max_steps > 0 and cfg.data.subset is not None


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.max_epoch=3", "did you mean 'trainer.max_epochs'"),
        ("method=simclrr", "unknown method preset 'simclrr'"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("optimizer.name=rmsprop", "choose one of"),
        ("batch_size=0", "must be > 0"),
        ("+method.tau=3", "method.tau"),
        ("+foo=1", "unknown config key 'foo'"),
        ("eval.features=pre", "choose one of"),
    ],
)
def test_bad_config_is_one_clear_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(override.split())
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_extra_yaml_file_is_merged_and_validated(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("trainer:\n  max_epochs: 3\n")
    assert load_config([], extra_files=[good]).trainer.max_epochs == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epohcs: 3\n")
    with pytest.raises(ConfigError, match="max_epochs"):
        load_config([], extra_files=[bad])


def test_cli_config_and_presets(capsys):
    from metassl.cli import main

    assert main(["config", "method=vicreg", "trainer.max_epochs=3"]) == 0
    text = capsys.readouterr().out
    assert "name: vicreg" in text and "max_epochs: 3" in text
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "method: barlow_twins, byol, moco_v2, simclr, simsiam, vicreg" in listing


def test_cli_bad_override_is_one_line(capsys):
    from metassl.cli import main

    assert main(["train", "trainer.max_epoch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metassl: error: unknown config key 'trainer.max_epoch'")


def test_method_preset_brings_its_optimizer_and_overrides_win():
    """VICReg's preset sets LARS (its paper's optimizer; SGD at the default lr diverges);
    command-line values still override it, other methods keep the top-level optimizer."""
    cfg = load_config(["method=vicreg"])
    assert cfg.method.name == "vicreg" and cfg.optimizer.name == "lars" and cfg.optimizer.weight_decay == 1e-4
    assert load_config(["method=vicreg", "optimizer.name=sgd"]).optimizer.name == "sgd"
    simclr = load_config(["method=simclr"]).optimizer
    assert (simclr.name, simclr.lr, simclr.weight_decay) == ("lars", 1.0, 5e-4)  # the top-level optimizer
    cfg = load_config(["method=vicreg", "regularizer=metamask", "regularizer.virtual_step=sgd"])
    assert cfg.regularizer.virtual_step == "sgd"


def test_backbone_constructor_keywords_from_the_command_line():
    """backbone.<key>=... reaches the builder's own keywords (no `+` needed): ConvNetSmall's
    widths, torchvision's model keywords; anything for timm models."""
    cfg = load_config(["backbone.widths=[16,32,64,128]", "backbone.in_channels=3"])
    assert list(cfg.backbone.widths) == [16, 32, 64, 128]
    assert load_config(["backbone=resnet18", "backbone.zero_init_residual=true"]).backbone.zero_init_residual is True
    assert load_config(["backbone.name=tv:mobilenet_v3_small", "backbone.dropout=0.1"]).backbone.dropout == 0.1
    assert load_config(["backbone.name=timm:resnet10t", "backbone.drop_rate=0.1"]).backbone.drop_rate == 0.1
    assert load_config(["backbone.cifar_stem=true"]).backbone.cifar_stem is True  # a preset key still overrides


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("backbone.widht=[8]", "unknown config key 'backbone.widht' for backbone convnet_small; did you mean 'backbone.widths'?"),
        ("backbone.foo=1", "backbone convnet_small accepts: cifar_stem, in_channels, input_size, pretrained, widths"),
        ("backbone=resnet18 backbone.widths=[8]", "unknown config key 'backbone.widths' for backbone resnet18"),
        ("backbone.name=tv:resnet_nope", "unknown torchvision classification model 'resnet_nope'"),
        ("backbone.name=vgg", "unknown backbone 'vgg'; options: convnet_small"),
    ],
)
def test_bad_backbone_keyword_is_one_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(override.split())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_backbone_keyword_the_constructor_rejects_is_one_line(tmp_path, capsys):
    from metassl.cli import main

    assert main(["train", "protocol=smoke", "backbone.widths=[8,8]", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["metassl: error: convnet_small has 4 blocks; got widths=(8, 8)"]


def test_precision_auto_is_the_default_and_valid():
    assert load_config([]).trainer.precision == "auto"
    with pytest.raises(ConfigError, match="choose one of: auto, 32-true"):
        load_config(["trainer.precision=fp8"])


def _every_pair_preset_composes(group: str) -> None:
    """Every ``configs/<group>_method/<name>_<method>.yaml`` names a real ``group`` preset and a
    real method, and the pair composes."""
    pairs = available_presets(f"{group}_method")
    assert pairs
    names, methods = available_presets(group), available_presets("method")
    for pair in pairs:
        name, method = next((n, pair[len(n) + 1:]) for n in names if pair.startswith(n + "_"))
        assert method in methods, pair
        load_config([f"{group}={name}", f"method={method}"])


def test_regularizer_method_values_apply_to_their_pair_only_and_overrides_win():
    """configs/regularizer_method/<regularizer>_<method>.yaml is composed for that pair alone; every
    such file names a real regularizer and method and composes; the command line and paper= still win."""
    pairs = available_presets("regularizer_method")
    assert "metamask_moco_v2" in pairs
    assert load_config(["method=moco_v2", "regularizer=metamask"]).regularizer.weight_drr == 0.1
    assert load_config(["method=moco_v2", "regularizer=metamask", "regularizer.weight_drr=1"]).regularizer.weight_drr == 1
    assert load_config(["method=simclr", "regularizer=metamask"]).regularizer.weight_drr == 1.0
    official = load_config(["method=moco_v2", "paper=metamask_cifar10"])
    assert official.regularizer.weight_drr == 1.0 and official.regularizer.drr_normalize is False
    _every_pair_preset_composes("regularizer")


def test_protocol_method_values_apply_to_their_pair_only_and_overrides_win():
    """configs/protocol_method/<protocol>_<method>.yaml is composed for that pair alone; every such
    file names a real protocol and method and composes; the command line still wins."""
    assert load_config(["protocol=cpu_cifar"]).method.temperature == 0.2
    assert load_config(["protocol=cpu_cifar", "method.temperature=0.5"]).method.temperature == 0.5
    assert load_config([]).method.temperature == 0.5  # the SimCLR preset elsewhere
    assert "temperature" not in load_config(["protocol=cpu_cifar", "method=barlow_twins"]).method
    assert load_config(["protocol=cpu_cifar", "data=imagefolder"]).data.aug.crop_scale_min == 0.2
    assert load_config(["protocol=cpu_cifar", "data=imagefolder", "method=barlow_twins"]).data.aug.crop_scale_min is None
    _every_pair_preset_composes("protocol")
