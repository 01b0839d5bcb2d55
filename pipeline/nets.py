"""Compact all-convolutional networks for small radar chips, registered as timm models.

`aconvnet` follows A-ConvNets (Chen et al., IEEE TGRS 2016): four convolutions (5x5, 5x5, 5x5, 3x3)
with three 2x2 max-pools, here with batch norm, 'same' padding (so any chip size works, 32-px EO too)
and global average pooling instead of the all-convolutional classifier. `aconvnet_wide` doubles the
widths; `aconvnet_fast` runs its first convolution at stride 2 (a quarter of the cost on 88-px chips,
for CPU runs). All are registered with timm (`timm.create_model("aconvnet", in_chans=1, num_classes=0)`), so
the rest of the pipeline treats them like any timm backbone.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from torch import Tensor, nn


class CompactConvNet(nn.Module):
    """conv-BN-ReLU blocks (pooled after all but the last), global average pooling, optional linear head."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64, 128), kernels: tuple[int, ...] = (5, 5, 5, 3),
        in_chans: int = 1, num_classes: int = 0, drop_rate: float = 0.0, stem_stride: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i, (width, kernel) in enumerate(zip(widths, kernels)):
            stride = stem_stride if i == 0 else 1
            conv = nn.Conv2d(channels, width, kernel, stride=stride, padding=kernel // 2, bias=False)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = channels
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"first_conv": "features.0", "classifier": "fc"}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.forward_features(x).mean(dim=(-2, -1))))


def _build(widths: tuple[int, ...], stem_stride: int = 1, **kwargs: Any) -> CompactConvNet:
    for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "img_size"):
        kwargs.pop(key, None)
    return CompactConvNet(widths=widths, stem_stride=stem_stride, **kwargs)


@register_model
def aconvnet(**kwargs: Any) -> CompactConvNet:
    """A-ConvNets-style compact net, widths 16-32-64-128."""
    return _build((16, 32, 64, 128), **kwargs)


@register_model
def aconvnet_wide(**kwargs: Any) -> CompactConvNet:
    """A-ConvNets-style compact net, widths 32-64-128-256."""
    return _build((32, 64, 128, 256), **kwargs)


@register_model
def aconvnet_fast(**kwargs: Any) -> CompactConvNet:
    """aconvnet with a stride-2 first convolution (for large chips on a CPU)."""
    return _build((16, 32, 64, 128), stem_stride=2, **kwargs)
