"""``visionmlp detect export``: a trained detector as one ONNX graph, checked with onnxruntime before it is kept.

The graph is torchvision's own detector traced whole, as torchvision exports its detection models: one RGB image
(3, H, W, float in [0, 1]) in; ``boxes`` (K, 4, x1 y1 x2 y2 in the image's pixels), ``labels`` (K, indices into the
class list, 1 = the first class), ``scores`` (K) and, for Mask R-CNN, ``masks`` (K, 1, H, W, probabilities) out.
Normalisation, resizing and non-maximum suppression are inside. The image size is fixed when the graph is traced
(``--img-size``, default the training input: S x S for a letterbox S, short x long for a keep-ratio resize): pad an
image at the bottom and right to it, which moves no box. The class names and the input size are stored in the
file's metadata (``classes``, ``input_size``).

``torch.export`` is not offered: it cannot trace the data-dependent number of boxes through torchvision's
non-maximum suppression.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.export import ONNX_OPSET, onnxruntime_session, require_onnxruntime
from .data import SyntheticScenes


def largest_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """The largest difference between two sets of detections of one image, each detection of ``expected`` paired with
    the nearest box of the same label in ``got`` (detections of equal score may come in either order); a ValueError
    when the sets differ in size or labels."""
    if len(got["boxes"]) != len(expected["boxes"]) or sorted(got["labels"].tolist()) != sorted(
            expected["labels"].tolist()):
        raise ValueError(f"onnxruntime found {len(got['boxes'])} detections where PyTorch found "
                         f"{len(expected['boxes'])}, or other labels: the graph does not reproduce the detector")
    if not len(expected["boxes"]):
        return 0.0
    distance = (expected["boxes"][:, None] - got["boxes"][None]).abs().amax(-1)
    distance[expected["labels"][:, None] != got["labels"][None]] = float("inf")
    pair = distance.argmin(1)
    return max((expected[name] - got[name][pair]).abs().max().item() for name in expected if name != "labels")


def check_image(size: tuple[int, int], index: int) -> torch.Tensor:
    """Scene ``index`` of the built-in synthetic set (shapes on a textured ground), scaled to fit ``size`` and padded
    at the bottom and right: an image with objects and edges, on which a trained detector finds boxes."""
    scene = torch.from_numpy(SyntheticScenes("val", index + 1).scene(index)[0]).permute(2, 0, 1).float() / 255
    scale = min(size[0] / scene.shape[1], size[1] / scene.shape[2])
    scene = F.interpolate(scene[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
    return F.pad(scene, (0, size[1] - scene.shape[2], 0, size[0] - scene.shape[1])).clamp(0, 1)


def export_detector_onnx(model: nn.Module, path: Path, size: tuple[int, int], classes: list[str]
                         ) -> tuple[float, int]:
    """Write ``model`` (eval mode) as ONNX for images of ``size`` (H, W). Returns the largest difference between
    onnxruntime's detections and PyTorch's on two images and how many detections were compared; a ValueError when
    the two find different boxes."""
    require_onnxruntime()  # before the export, which takes a while; onnx comes with it in the deploy extra
    import onnx

    with torch.no_grad():
        names = list(model([check_image(size, 0)])[0])  # RetinaNet and the R-CNNs order their outputs differently
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer notes every shape it fixes; the image size is fixed on purpose, and checked below
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter needs no onnxscript
        warnings.simplefilter("ignore", UserWarning)  # torchvision: "exporting for a batch of one image"
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's helpers are torch.jit.script functions
        torch.onnx.export(model, ([check_image(size, 0)],), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names)
    graph = onnx.load(str(path))
    for key, value in (("classes", json.dumps(classes)), ("input_size", json.dumps(list(size)))):
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))
    session = onnxruntime_session(path)
    max_diff, compared = 0.0, 0
    for index in (0, 1):  # the traced image and another: nothing of the first may be frozen into the graph
        image = check_image(size, index)
        with torch.no_grad():
            expected = model([image])[0]
        got = {name: torch.from_numpy(value) for name, value in zip(names, session.run(None, {"image": image.numpy()}))}
        max_diff = max(max_diff, largest_difference(expected, got))
        compared += len(expected["boxes"])
    return max_diff, compared
