"""Semantic segmentation networks on a visionmlp backbone: semantic FPN and UperNet.

* ``fpn``: the semantic branch of Panoptic FPN (Kirillov et al., 2019), which mmsegmentation's FPN neck with its
  FPNHead is and which the RaftMLP seed trains on ADE20K: torchvision's ``FeaturePyramidNetwork`` on the stride 4-32
  maps, then per level 3x3 convolution, norm and ReLU blocks, each followed by a 2x up-sampling until stride 4, summed,
  and a 1x1 classifier.
* ``upernet``: UperNet (Xiao et al., 2018), segmentation_models_pytorch's ``UPerNetDecoder`` (pyramid pooling on the
  stride-32 map, an FPN, all levels fused at stride 4), then a 1x1 classifier.

Logits come out at the input's size (bilinear up-sampling from stride 4).
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from ..models.pyramid import PyramidBackbone, buildable_img_size

__all__ = ["SemanticFPNHead", "Segmenter", "build_segmenter"]


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch over FPN maps at strides 4, 8, 16, 32: level ``i`` goes through ``max(i, 1)``
    conv-norm-ReLU blocks, each but the first level's followed by a 2x bilinear up-sampling; the sum is classified."""

    def __init__(self, in_chans: int, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()

        def block(c_in: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                 nn.ReLU(inplace=True))

        self.scale_heads = nn.ModuleList([
            nn.ModuleList([block(in_chans if k == 0 else channels) for k in range(max(level, 1))])
            for level in range(4)
        ])
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Class logits at the size of the first (stride-4) map."""
        out = None
        for level, (x, blocks) in enumerate(zip(maps, self.scale_heads)):
            for k, conv in enumerate(blocks):
                x = conv(x)
                if level > 0:  # up one octave per block; the last lands on the stride-4 grid exactly
                    size = maps[level - k - 1].shape[-2:]
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        return self.classifier(self.dropout(out))


class UperNetHead(nn.Module):
    """segmentation_models_pytorch's UperNet decoder and a 1x1 classifier, on four maps at strides 4 to 32."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        try:
            from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
        except ImportError:
            raise ImportError("the UperNet decoder comes from segmentation-models-pytorch: pip install "
                              "'visionmlp[dense]' (or --decoder fpn, which needs nothing more)") from None

        # the decoder's channel list starts at strides 1 and 2, which it skips
        self.decoder = UPerNetDecoder([3, 0, *in_channels], encoder_depth=5, decoder_channels=channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Class logits at the size of the first (stride-4) map."""
        return self.classifier(self.dropout(self.decoder([maps[0], maps[0], *maps])))


class Segmenter(nn.Module):
    """Backbone, decoder, logits at the input size."""

    def __init__(self, backbone: PyramidBackbone, decoder: str, num_classes: int, channels: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        if decoder == "fpn":
            channels = channels or 256
            self.neck: nn.Module | None = FeaturePyramidNetwork(backbone.channels, channels)
            self.head: nn.Module = SemanticFPNHead(channels, channels // 2, num_classes, dropout)
        elif decoder == "upernet":
            self.neck = None
            self.head = UperNetHead(backbone.channels, channels or 512, num_classes, dropout)
        else:
            raise ValueError(f"decoder must be 'fpn' or 'upernet', got {decoder!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, classes, H, W) for images (N, 3, H, W)."""
        maps = self.backbone(x)
        maps = list((self.neck(maps) if self.neck is not None else maps).values())
        logits = self.head(maps)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(model_cfg: dict[str, Any], num_classes: int, img_size: tuple[int, int],
                    checkpoint: str | os.PathLike | None = None) -> Segmenter:
    """The network ``model_cfg`` describes (the ``model`` section of a segmentation config)."""
    kwargs = dict(model_cfg["kwargs"] or {})
    kwargs["drop_path_rate"] = model_cfg["drop_path_rate"]
    if model_cfg["dynamic_img_size"]:
        kwargs["dynamic_img_size"] = True
    if model_cfg["dynamic_img_size"] or model_cfg["name"].startswith(("ms_mlp", "repmlpnet")):
        # backbones of any input size keep the variant's own: RaftMLP its trained token grid (which an ImageNet
        # checkpoint must fit), RepMLPNet its partition size (tiled over larger inputs); MS-MLP has no grid
        img_size = tuple(timm.get_pretrained_cfg_value(model_cfg["name"], "input_size")[1:])
    else:  # grid-bound: built for the crop, rounded up to a size the variant can be built for (ViP: 14 px)
        img_size = buildable_img_size(model_cfg["name"], img_size, kwargs)
    backbone = PyramidBackbone(model_cfg["name"], img_size, checkpoint=checkpoint,
                               simple_pyramid_channels=model_cfg["simple_pyramid_channels"], **kwargs)
    return Segmenter(backbone, model_cfg["decoder"], num_classes, model_cfg["decoder_channels"],
                     model_cfg["dropout"])
