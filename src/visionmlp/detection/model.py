"""Detectors on the visionmlp backbones: torchvision's RetinaNet, Faster R-CNN and Mask R-CNN over a feature pyramid.

Backbone. :class:`visionmlp.models.pyramid.PyramidBackbone` gives four maps C2-C5 at strides 4 to 32 (ViP, which
keeps one stride after its first stage, gets a simple pyramid built from its last map, as ViTDet does); torchvision's
``FeaturePyramidNetwork`` turns them into P2-P6 for the R-CNNs (C2-C5, ``LastLevelMaxPool``) or P3-P7 for RetinaNet
(C3-C5, ``LastLevelP6P7`` from C5), as the RaftMLP seed's mmdetection configs do. Anchors are theirs too: RetinaNet
three scales per octave from 4 x stride, the R-CNNs one of 8 x stride, ratios 0.5, 1 and 2.

Input sizes. torchvision's ``GeneralizedRCNNTransform`` resizes every image on its own, while ViP, Strip-MLP and
RaftMLP are built for one token grid. The policy (``data.img_size``):

* letterbox, for every family (``data.img_size: S``, a multiple of 32): each image is scaled so that its longer
  side is S (``min_size = max_size = S``), the batch is padded bottom/right to a multiple of 32, and the backbone,
  built for S x S (ViP: rounded up to its 14-pixel grid), pads to the size it takes. Padding at the bottom and right
  moves no coordinate, and torchvision's ``postprocess`` maps boxes and masks back to each original image.
* keep-ratio, the seed's official resize (``data.img_size: [1333, 800]``, the default where it applies): each image
  scaled to fit 1333 x 800 keeping its aspect; for the backbones that take any size: RaftMLP with
  ``model.dynamic_img_size`` (the official RaftMLP behaviour: token maps resized to the trained grid around each
  token mixing), MS-MLP (multiples of 32) and RepMLPNet (padded to multiples of its partition size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.layers import to_2tuple
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from ..models.pyramid import PyramidBackbone, buildable_img_size
from .config import resize_policy, takes_any_size

RETINANET_STRIDES = (8, 16, 32, 64, 128)
RCNN_STRIDES = (4, 8, 16, 32, 64)


class PyramidFPN(nn.Module):
    """A :class:`PyramidBackbone` with torchvision's FPN on the maps ``levels`` (as torchvision's ``BackboneWithFPN``
    does for a ResNet): images in, an ``OrderedDict`` of ``out_channels``-wide maps out."""

    def __init__(self, body: PyramidBackbone, levels: tuple[int, ...], out_channels: int, extra_blocks: nn.Module
                 ) -> None:
        super().__init__()
        self.body = body
        self.levels = tuple(str(i) for i in levels)
        self.fpn = FeaturePyramidNetwork([body.channels[i] for i in levels], out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The FPN's maps of ``x``, finest first."""
        maps = self.body(x)
        return self.fpn(OrderedDict((name, maps[name]) for name in self.levels))


def backbone_img_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """The size the backbone is built for (see the module docstring)."""
    model = config["model"]
    if model["img_size"] is not None:
        return tuple(to_2tuple(model["img_size"]))
    if takes_any_size(config):
        # the variant's own: RepMLPNet tiles its input with partitions of this size, dynamic RaftMLP resizes its token
        # maps to this grid, MS-MLP takes any multiple of 32 whatever it is built for
        return tuple(timm.get_pretrained_cfg_value(model["name"], "input_size")[1:])
    return buildable_img_size(model["name"], resize_policy(config)[1], model["kwargs"] or {})


def anchor_generator(detector: str, scale: float | None, ratios: list[float]) -> AnchorGenerator:
    """mmdetection's anchors: RetinaNet ``scale x stride x 2^(i/3)`` for i = 0, 1, 2 on P3-P7 (scale 4), the R-CNNs
    ``scale x stride`` on P2-P6 (scale 8)."""
    if detector == "retinanet":
        scale = 4.0 if scale is None else scale
        sizes = tuple(tuple(scale * stride * 2 ** (i / 3) for i in range(3)) for stride in RETINANET_STRIDES)
    else:
        scale = 8.0 if scale is None else scale
        sizes = tuple((scale * stride,) for stride in RCNN_STRIDES)
    return AnchorGenerator(sizes, (tuple(ratios),) * len(sizes))


def build_detector(config: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The configured detector for ``num_classes`` classes plus background (label 0), its backbone initialised from
    ``model.pretrained`` when one is given."""
    model_cfg, detector = config["model"], config["detector"]
    kwargs = dict(model_cfg["kwargs"] or {}, drop_path_rate=model_cfg["drop_path_rate"])
    if model_cfg["dynamic_img_size"]:
        kwargs["dynamic_img_size"] = True
    channels = model_cfg["fpn_channels"]
    body = PyramidBackbone(model_cfg["name"], backbone_img_size(config), checkpoint=model_cfg["pretrained"],
                           simple_pyramid_channels=channels, **kwargs)
    if detector == "retinanet":  # C3-C5, P6 and P7 from C5 (mmdetection's add_extra_convs="on_input")
        backbone = PyramidFPN(body, (1, 2, 3), channels, LastLevelP6P7(body.channels[3], channels))
    else:
        backbone = PyramidFPN(body, (0, 1, 2, 3), channels, LastLevelMaxPool())
    min_size, max_size = resize_policy(config)
    pretrained_cfg = body.body.pretrained_cfg
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(pretrained_cfg["mean"]),
                  image_std=list(pretrained_cfg["std"]))
    anchors = anchor_generator(detector, model_cfg["anchor_scale"], model_cfg["anchor_ratios"])
    if detector == "retinanet":
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, score_thresh=model_cfg["score_thresh"],
                         nms_thresh=model_cfg["nms_thresh"], detections_per_img=model_cfg["detections_per_img"],
                         **common)
    representation = model_cfg["box_head_dim"]
    rcnn = dict(
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(channels * 7 * 7, representation),  # 7 x 7: MultiScaleRoIAlign's output
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_batch_size_per_image=model_cfg["rois_per_image"],
        rpn_pre_nms_top_n_train=2 * model_cfg["rpn_proposals"], rpn_post_nms_top_n_train=model_cfg["rpn_proposals"],
        rpn_pre_nms_top_n_test=model_cfg["rpn_proposals"], rpn_post_nms_top_n_test=model_cfg["rpn_proposals"],
        box_score_thresh=model_cfg["score_thresh"], box_nms_thresh=model_cfg["nms_thresh"],
        box_detections_per_img=model_cfg["detections_per_img"], **common)
    if detector == "faster_rcnn":
        return FasterRCNN(backbone, None, **rcnn)
    return MaskRCNN(backbone, None, mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
                    mask_predictor=MaskRCNNPredictor(channels, channels, num_classes), **rcnn)


def backbone_body(detector: nn.Module) -> nn.Module:
    """The visionmlp classifier trunk inside a detector (what ``--deploy`` folds)."""
    return detector.backbone.body.body
