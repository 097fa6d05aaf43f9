"""Dense evaluation (`metassl eval segment`, docs/algorithms.md §7.4), its datasets, and the
torchvision transfer of an exported ResNet (docs/dense_transfer.md)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from metassl.cli import main
from metassl.data.errors import CorruptImageError, DataConfigError, DatasetNotFoundError
from metassl.data.segmentation import SegmentationFolder, segmentation_splits
from metassl.eval.segment import (
    DenseHead,
    build_head,
    check_segmentation_options,
    confusion_matrix,
    evaluate_segmentation,
    fit_dense_head,
    pixel_cross_entropy,
    segmentation_scores,
)
from metassl.models.backbones import ConvNetSmall

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------- metrics and loss


def test_scores_hand_case_with_ignore_and_absent_class(one_thread):
    target = torch.tensor([[0, 0, 1, 255], [1, 1, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 0, 0, 0]])  # predictions on 255 pixels count for nothing
    confmat = confusion_matrix(pred, target, num_classes=4)
    # rows true, cols predicted; counted pixels: (0->0) (0->1) (1->1) (1->1) (1->0) (0->0)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 0] = 2, 1, 2, 1
    assert torch.equal(confmat, expected)
    scores = segmentation_scores(confmat)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 1 -> 2/4; classes 2, 3 absent -> NaN, left out
    assert scores["iou"][:2] == [0.5, 0.5] and all(math.isnan(v) for v in scores["iou"][2:])
    assert scores["miou"] == 0.5
    assert scores["pixel_acc"] == 4 / 6
    # a class predicted but never true has IoU 0 and counts in the mean
    scores = segmentation_scores(confusion_matrix(torch.tensor([2, 0, 1]), torch.tensor([0, 0, 1]), 3))
    assert scores["iou"] == [0.5, 1.0, 0.0] and scores["miou"] == pytest.approx(0.5)
    from torchmetrics.classification import MulticlassJaccardIndex  # the same mean as torchmetrics' macro IoU

    assert segmentation_scores(confmat)["miou"] == pytest.approx(float(MulticlassJaccardIndex(4, ignore_index=255)(pred, target)))


def test_pixel_cross_entropy_hand_case(one_thread):
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, K=2, H=1, W=2)
    target = torch.tensor([[[0, 255]]])  # (B, H, W)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))  # only the first pixel counts
    assert float(pixel_cross_entropy(logits, target)) == pytest.approx(expected)
    target = torch.tensor([[[0, 1]]])
    second = -math.log(math.exp(1.0) / (1.0 + math.exp(1.0)))
    assert float(pixel_cross_entropy(logits, target)) == pytest.approx((expected + second) / 2)
    logits.requires_grad_(True)
    loss = pixel_cross_entropy(logits, torch.full((1, 1, 2), 255))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_head_gradients_match_finite_differences(kind, one_thread):
    torch.manual_seed(0)
    core = build_head(kind, in_channels=2, num_classes=3, hidden_dim=2).double()
    head = DenseHead(core, torch.tensor([0.1, -0.2]), torch.tensor([1.5, 0.5])).double().eval()
    fmap = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1, 2, 255, 1, 0], [2, 2, 1, 0, 255, 1], [0, 0, 1, 1, 2, 2], [1, 255, 0, 2, 1, 0]]])
    names = [name for name, _ in head.named_parameters()]

    def loss(fm, *weights):  # the head at the probed weights
        logits = torch.func.functional_call(head, dict(zip(names, weights)), (fm, (4, 6)))
        return pixel_cross_entropy(logits, target)

    weights = tuple(p.detach().clone().requires_grad_(True) for _, p in head.named_parameters())
    assert torch.autograd.gradcheck(loss, (fmap, *weights), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- head training and selection


def _toy_segmentation(n: int, size: int = 16, seed: int = 0):
    """Bright squares on dark noise: mask = the square (class 1), 255 on a one-pixel border."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=gen) * 0.3
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        s = int(torch.randint(4, 8, (1,), generator=gen))
        y, x = (int(v) for v in torch.randint(0, size - s, (2,), generator=gen))
        images[i, :, y : y + s, x : x + s] += 0.7
        masks[i, y : y + s, x : x + s] = 1
    masks[:, 0, :] = 255
    return TensorDataset(images, masks)


def test_selection_uses_validation_never_test(one_thread):
    torch.manual_seed(0)
    backbone = ConvNetSmall(widths=(8, 8, 8, 8))
    train, test_a, test_b = _toy_segmentation(48), _toy_segmentation(16, seed=1), _toy_segmentation(16, seed=2)
    options = dict(head="linear", epochs=4, lr=0.01, batch_size=8, val_fraction=0.25, seed=3)
    a = evaluate_segmentation(backbone, train, test_a, 2, **options)
    b = evaluate_segmentation(backbone, train, test_b, 2, **options)
    assert a["segment_best_epoch"] == b["segment_best_epoch"] and a["segment_val_miou_best"] == b["segment_val_miou_best"]
    assert a["segment_num_train"] == 36 and a["segment_num_val"] == 12 and a["segment_num_test"] == 16
    assert a["segment_feature_map"] == [8, 2, 2] and a["segment_image_size"] == [16, 16]
    assert a["segment_miou_best_val"] != b["segment_miou_best_val"]  # the test sets differ, and only the test score moves
    # the kept epoch is the best validation mIoU of the history
    maps = torch.randn(20, 4, 2, 2)
    masks = torch.randint(0, 2, (20, 8, 8))
    fit = fit_dense_head(maps[:14], masks[:14], maps[14:], masks[14:], 2, epochs=5, lr=0.05, batch_size=4)
    vals = [h["val_miou"] for h in fit.history]
    assert fit.best_epoch == vals.index(max(vals))
    assert fit.best is not fit.last and not fit.best.training


def test_options_and_backbone_without_maps_are_one_line():
    good = dict(head="linear", hidden_dim=8, epochs=1, lr=0.1, weight_decay=0.0, batch_size=4, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"choose one of: linear, conv"):
        check_segmentation_options(ConvNetSmall(), **{**good, "head": "mlp"})
    with pytest.raises(ValueError, match=r"eval.segment.epochs=0 must be > 0"):
        check_segmentation_options(ConvNetSmall(), **{**good, "epochs": 0})
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"has no spatial feature map .*convnet_small") as err:
        check_segmentation_options(flat, **good)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- datasets


def _save_image(path, h, w, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _save_mask(path, values, mode="L"):
    values = np.asarray(values, dtype=np.uint8)
    if mode == "P":
        im = Image.fromarray(values, mode="L").convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
        im.save(path)
    else:
        Image.fromarray(values, mode="L").save(path)


def _mask_values(h, w, classes=3):
    values = (np.arange(h * w).reshape(h, w) // max(1, (h * w) // classes)).clip(0, classes - 1)
    values[0, 0] = 255
    return values


def _folder(root, size=(12, 16), n_train=3, n_test=2, classes=3):
    h, w = size
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            ext = "png" if i % 2 == 0 else "jpg"
            _save_image(root / split / "images" / f"img{i}.{ext}", h, w, seed=i)
            _save_mask(root / split / "masks" / f"img{i}.png", _mask_values(h, w, classes), mode="P" if i == 1 else "L")
    return root


def test_folder_dataset_pairs_and_geometry(tmp_path, one_thread):
    root = _folder(tmp_path / "seg")
    train, test, k = segmentation_splits(str(root), {"name": "builtin", "image_size": 8})
    assert k == 3 and len(train) == 3 and len(test) == 2  # classes 0..2 in the train masks, 255 ignored
    image, mask = train[1]  # a JPEG with a palette mask: the indices are read, not the palette colours
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and mask.shape == (8, 8) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
    # 12x16 -> shorter side 8 -> 8x10 (mask: nearest) -> centre crop 8x8, identical for image and mask
    raw = np.asarray(Image.open(root / "train" / "masks" / "img1.png"))
    full = F.interpolate(torch.from_numpy(raw.astype(np.float32))[None, None], size=(8, 10), mode="nearest")[0, 0].long()
    assert torch.equal(mask, full[:, 1:9])
    rgb = torch.from_numpy(np.asarray(Image.open(root / "train" / "images" / "img0.png").convert("RGB")).copy()).permute(2, 0, 1)
    from torchvision.transforms.v2 import functional as TF

    expected = TF.center_crop(TF.resize(rgb, 8, antialias=True), [8, 8]).float() / 255.0
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    torch.testing.assert_close(train[0][0], (expected - mean) / std)
    # the same size as the image: no resampling at all
    same, _, _ = segmentation_splits(str(root), {"name": "builtin"}, image_size=12, num_classes=3)
    assert same.image_size == 12 and same[0][1].shape == (12, 12)


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        SegmentationFolder(tmp_path / "none", "train", 8, *IMAGENET)
    assert "expected the layout <root>/{train,test}/images" in _one_line(err)

    root = _folder(tmp_path / "a")
    (root / "train" / "masks" / "img2.png").unlink()
    with pytest.raises(DataConfigError) as err:
        SegmentationFolder(root, "train", 8, *IMAGENET)
    assert "have no mask of the same stem" in _one_line(err) and "img2.png" in str(err.value)

    root = _folder(tmp_path / "b")
    _save_mask(root / "train" / "masks" / "extra.png", _mask_values(12, 16))
    with pytest.raises(DataConfigError) as err:
        SegmentationFolder(root, "train", 8, *IMAGENET)
    assert "have no image of the same stem" in _one_line(err) and "extra.png" in str(err.value)

    root = _folder(tmp_path / "c")
    _save_mask(root / "test" / "masks" / "img0.png", _mask_values(12, 15))
    with pytest.raises(DataConfigError) as err:
        segmentation_splits(str(root), {"name": "builtin"})
    assert "is 15x12 but its image img0.png is 16x12" in _one_line(err) and "must have its image's size" in str(err.value)

    root = _folder(tmp_path / "d")
    Image.new("RGB", (16, 12)).save(root / "train" / "masks" / "img0.png")
    with pytest.raises(DataConfigError) as err:
        SegmentationFolder(root, "train", 8, *IMAGENET, num_classes=3)[0]
    assert "single-channel PNGs" in _one_line(err)

    root = _folder(tmp_path / "e", classes=3)
    with pytest.raises(DataConfigError) as err:
        segmentation_splits(str(root), {"name": "builtin"}, num_classes=2)[0][0]
    assert "raise eval.segment.num_classes" in _one_line(err)

    (root / "train" / "images" / "img0.jpg").write_bytes(b"not an image")
    with pytest.raises(DataConfigError, match="share the stem"):
        SegmentationFolder(root, "train", 8, *IMAGENET)
    (root / "train" / "images" / "img0.png").unlink()
    with pytest.raises(CorruptImageError):
        SegmentationFolder(root, "train", 8, *IMAGENET)


def test_run_data_gives_the_builtin_foreground_masks():
    from metassl.data.builtin import BuiltinShapes

    cfg = {"name": "builtin", "num_train": 40, "num_test": 20, "subset": 24}
    train, test, k = segmentation_splits("run", cfg)
    assert k == 2 and len(train) == 24 and len(test) == 20
    image, mask = train[5]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.long
    assert torch.equal(mask, BuiltinShapes("train", 40, background_contrast=0.3).masks[5].long())
    with pytest.raises(DataConfigError, match=r"only the built-in data has .* eval.segment.dataset=<root>"):
        segmentation_splits("run", {"name": "cifar10"})


# ----------------------------------------------------------------------------- `metassl eval segment`


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("segrun") / "simclr"
    args = ["train", "protocol=smoke", f"output_dir={out}", "data.num_train=160", "data.num_test=60",
            "method.proj_hidden_dim=64", "method.proj_output_dim=32", "trainer.max_steps=-1", "eval.knn_init=false"]
    assert main(args) == 0
    return out / "checkpoints" / "last.ckpt"


def test_eval_segment_end_to_end_beats_a_constant_predictor(trained_run, tmp_path, capsys, one_thread):
    capsys.readouterr()
    out = tmp_path / "segment.json"
    args = ["eval", "segment", "--ckpt", str(trained_run), "eval.segment.epochs=20", "eval.segment.lr=0.01",
            "eval.segment.batch_size=16", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["dataset"] == "builtin" and result["backbone"] == "convnet_small" and result["segment_num_classes"] == 2
    assert result["segment_num_train"] + result["segment_num_val"] == 128 and result["segment_num_test"] == 60  # smoke: subset 128
    assert result["segment_feature_map"] == [256, 4, 4] and result["segment_image_size"] == [32, 32]
    # the constant predictor (majority class = background everywhere): IoU of the object 0
    assert result["segment_constant_miou"] < 0.5 and result["segment_iou_per_class_best_val"][1] > 0.3
    assert result["segment_miou_best_val"] > result["segment_constant_miou"] + 0.15
    assert result["segment_pixel_acc_best_val"] > result["segment_constant_pixel_acc"]


def test_eval_segment_on_a_folder_and_old_checkpoints(trained_run, tmp_path, capsys, one_thread):
    root = _folder(tmp_path / "seg", size=(32, 32), n_train=6, n_test=2, classes=3)
    # a checkpoint from before eval.segment existed gets its defaults
    ckpt = torch.load(trained_run, map_location="cpu", weights_only=False)
    del ckpt["hyper_parameters"]["cfg"]["eval"]["segment"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    args = ["eval", "segment", "--ckpt", str(old), f"eval.segment.dataset={root}", "eval.segment.head=conv",
            "eval.segment.epochs=2", "eval.segment.hidden_dim=16", "eval.segment.image_size=16"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == str(root) and result["segment_num_classes"] == 3
    assert result["segment_image_size"] == [16, 16] and result["segment_feature_map"] == [256, 2, 2]
    assert result["segment_config"]["head"] == "conv" and result["segment_config"]["hidden_dim"] == 16
    assert 0.0 <= result["segment_miou_best_val"] <= 1.0


@pytest.mark.parametrize(
    "override, message",
    [("eval.segment.head=mlp", "choose one of: linear, conv"), ("eval.segment.lr=0", "eval.segment.lr=0 must be > 0"),
     ("eval.segment.epochs=two", "has the wrong type"), ("eval.segment.dataset=/no/such/root", "expected the layout")],
)
def test_eval_segment_bad_input_is_one_line(trained_run, capsys, override, message):
    assert main(["eval", "segment", "--ckpt", str(trained_run), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# ----------------------------------------------------------------------------- torchvision transfer


def test_exported_resnet18_in_torchvision_segmentation_and_detection(tmp_path, one_thread):
    from metassl.eval.transfer import detection_model, segmentation_model

    run = tmp_path / "r18"
    args = ["train", "protocol=smoke", "backbone=resnet18", f"output_dir={run}", "data.num_train=64", "data.num_test=32",
            "data.subset=32", "batch_size=16", "trainer.max_steps=2", "eval.knn_init=false", "eval.val_fraction=0",
            "method.proj_hidden_dim=64", "method.proj_output_dim=32"]
    assert main(args) == 0
    exported = tmp_path / "backbone.pt"
    assert main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(exported)]) == 0
    state = torch.load(exported, weights_only=True)
    assert state["conv1.weight"].shape == (64, 3, 3, 3)  # the CIFAR stem at 32 px
    seg = segmentation_model(exported, num_classes=3, head="deeplabv3", aux_loss=True).eval()
    body = seg.backbone.state_dict()
    assert set(body) == set(state) and all(torch.equal(body[k], v) for k, v in state.items())
    with torch.no_grad():
        out = seg(torch.randn(1, 3, 32, 32))
    assert out["out"].shape == (1, 3, 32, 32) and out["aux"].shape == (1, 3, 32, 32)
    fcn = segmentation_model(exported, num_classes=2, head="fcn").eval()
    assert torch.equal(fcn.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])

    det = detection_model(exported, num_classes=4, min_size=48, max_size=48).eval()
    body = det.backbone.body.state_dict()
    ours = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # frozen BN keeps no counter
    assert set(body) == set(ours) and all(torch.equal(body[k], v) for k, v in ours.items())
    assert not det.backbone.body.conv1.weight.requires_grad and det.backbone.body.layer4[0].conv1.weight.requires_grad
    with torch.no_grad():
        (found,) = det([torch.rand(3, 40, 40)])
    assert {"boxes", "labels", "scores"} <= set(found) and found["boxes"].shape[-1] == 4
    assert ((found["boxes"] >= 0) & (found["boxes"] <= 40)).all()


def test_resnet50_transfer_matches_torchvision_builders(one_thread):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

    from metassl.eval.transfer import detection_model, segmentation_model
    from metassl.models.backbones import build_backbone

    state = build_backbone("resnet50", cifar_stem=False)[0].state_dict()  # what `metassl export` writes

    def layout(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}, str(model)

    pairs = [
        (segmentation_model(state, 5, "fcn", aux_loss=True), fcn_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)),
        (segmentation_model(state, 5), deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5)),
        (detection_model(state, 5, trainable_layers=5, frozen_bn=False),
         fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)),
    ]
    for ours, theirs in pairs:  # same modules (dilations, norms, heads), same parameter names and shapes
        assert layout(ours) == layout(theirs)
    assert torch.equal(pairs[0][0].backbone.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])


def test_transfer_refuses_a_non_resnet_export(tmp_path):
    from metassl.eval.transfer import detection_model, segmentation_model

    path = tmp_path / "convnet.pt"
    torch.save(ConvNetSmall().state_dict(), path)
    for build in (segmentation_model, detection_model):
        with pytest.raises(ValueError, match=r"not a ResNet .* backbone=resnet18") as err:
            build(path, num_classes=2)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="metassl export"):
        segmentation_model(tmp_path / "missing.pt", num_classes=2)
    with pytest.raises(ValueError, match="choose one of: deeplabv3, fcn"):
        segmentation_model(path, num_classes=2, head="unet")
