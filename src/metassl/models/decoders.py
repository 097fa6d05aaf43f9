"""Light pixel decoders: a backbone's spatial map ``(B, C, h, w)`` -> an image ``(B, 3, H, W)``.

MRCL's reconstruction head (docs/algorithms.md §6.3, a reconstruction: the paper gives no
decoder).  Two designs, both cheap next to the backbone:

- :class:`ConvUpsamplingDecoder` (``decoder=conv``), for CNN maps: a 1x1 projection to
  ``width`` channels, then one stage per factor 2 of the backbone's stride (nearest 2x
  upsampling and ``depth`` conv3x3-BN-ReLU blocks, the width halved per stage, at least 8),
  and a linear 1x1 convolution to the pixels (the U-Net-free decoder of a convolutional
  autoencoder);
- :class:`PatchLinearDecoder` (``decoder=linear``), for token maps: every map cell predicts its
  own ``s × s × 3`` pixel patch with one linear map (MAE's prediction head, He et al., CVPR 2022,
  arXiv:2111.06377, §3 "MAE decoder"), laid out by a pixel shuffle.  It also takes
  ``(B, N, D)`` tokens on a square grid.

Both end with a bilinear resize when the backbone's stride does not map ``(h, w)`` exactly onto
``(H, W)`` (odd sizes, non-power-of-two strides).  :func:`feature_map_geometry` measures a
backbone's map channels and stride once, with one probe forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DECODERS", "ConvUpsamplingDecoder", "PatchLinearDecoder", "build_decoder", "feature_map_geometry"]

DECODERS = ("conv", "linear")
MIN_WIDTH = 8
PROBE_SIZE = 64


def _fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _check_map(fmap: torch.Tensor, channels: int) -> None:
    if fmap.dim() != 4 or fmap.shape[1] != channels:
        raise ValueError(f"the decoder expects feature maps (B, {channels}, h, w); got shape {tuple(fmap.shape)}")


class ConvUpsamplingDecoder(nn.Module):
    """``(B, C, h, w) -> (B, out_channels, H, W)`` by ``ceil(log2(stride))`` upsampling stages
    (module docstring); ``forward(fmap, size)`` resizes the last stage to ``size`` if needed."""

    def __init__(self, in_channels: int, stride: int, width: int = 64, depth: int = 1, out_channels: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 1 or stride < 1 or in_channels < 1:
            raise ValueError(f"conv decoder needs width, depth, stride, in_channels >= 1; got {width}, {depth}, {stride}, {in_channels}")
        self.in_channels = int(in_channels)
        self.stride = int(stride)
        self.num_stages = math.ceil(math.log2(stride)) if stride > 1 else 0
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, c = [], width
        for k in range(self.num_stages):
            c_out = max(MIN_WIDTH, width // 2 ** (k + 1))
            layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")]
            for j in range(depth):
                layers += [nn.Conv2d(c if j == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
            c = c_out
        if not stages:  # stride 1: the depth blocks at full resolution
            stages.append(nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))]))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        _check_map(fmap, self.in_channels)
        return _fit(self.head(self.stages(self.stem(fmap))), size)


class PatchLinearDecoder(nn.Module):
    """One linear map per cell: ``(B, C, h, w) -> (B, out·s², h, w) -> pixel shuffle -> (B, out, s·h, s·w)``;
    ``(B, N, D)`` tokens are read as a square ``√N × √N`` grid first."""

    def __init__(self, in_channels: int, stride: int, out_channels: int = 3) -> None:
        super().__init__()
        if stride < 1 or in_channels < 1:
            raise ValueError(f"linear decoder needs stride, in_channels >= 1; got {stride}, {in_channels}")
        self.in_channels = int(in_channels)
        self.stride = int(stride)
        self.proj = nn.Conv2d(in_channels, out_channels * stride**2, 1)
        self.shuffle = nn.PixelShuffle(stride)

    @staticmethod
    def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tokens of a square grid (no class token) -> ``(B, D, √N, √N)``."""
        b, n, d = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; drop class/register tokens before decoding")
        return tokens.transpose(1, 2).reshape(b, d, side, side)

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if fmap.dim() == 3:
            fmap = self.tokens_to_map(fmap)
        _check_map(fmap, self.in_channels)
        return _fit(self.shuffle(self.proj(fmap)), size)


def build_decoder(kind: str, in_channels: int, stride: int, width: int = 64, depth: int = 1, out_channels: int = 3) -> nn.Module:
    """``kind`` ``conv`` (:class:`ConvUpsamplingDecoder`) or ``linear`` (:class:`PatchLinearDecoder`;
    ``width`` and ``depth`` unused)."""
    if kind == "conv":
        return ConvUpsamplingDecoder(in_channels, stride, width=width, depth=depth, out_channels=out_channels)
    if kind == "linear":
        return PatchLinearDecoder(in_channels, stride, out_channels=out_channels)
    raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {kind!r}")


@torch.no_grad()
def feature_map_geometry(backbone: nn.Module, probe_size: int = PROBE_SIZE, in_channels: int = 3) -> tuple[int, int]:
    """``(channels, stride)`` of ``backbone.forward_features`` from one eval-mode forward of a
    ``probe_size``-pixel zero image (batch-norm statistics untouched; training mode restored)."""
    ref = next(iter(backbone.parameters()), None)
    probe = torch.zeros(1, in_channels, probe_size, probe_size, device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
    was_training = backbone.training
    backbone.eval()
    try:
        fmap = backbone.forward_features(probe)
    finally:
        backbone.train(was_training)
    if fmap.dim() != 4:
        raise ValueError(f"forward_features returned shape {tuple(fmap.shape)}, not a (B, C, H, W) map")
    return int(fmap.shape[1]), max(1, round(probe_size / fmap.shape[-1]))
