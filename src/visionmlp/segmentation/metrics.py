"""mIoU, mAcc and aAcc as mmsegmentation computes them: one confusion matrix over the whole data set.

Per class, IoU = TP / (TP + FP + FN) and accuracy = TP / (TP + FN); a class absent from both the labels and the
predictions of the whole set has no IoU and is left out of the means (NaN-mean), as in mmsegmentation. Pixels labelled
255 are ignored. aAcc is the share of labelled pixels predicted right.
"""

from __future__ import annotations

import torch

from .data import IGNORE_INDEX

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates a (classes x classes) matrix, rows the labels, columns the predictions."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """Count one prediction map against its label map (same shape)."""
        keep = label != IGNORE_INDEX
        label, prediction = label[keep].to(torch.int64), prediction[keep].to(torch.int64)
        if label.numel() and int(label.max()) >= self.num_classes:
            raise ValueError(f"a label map holds class {int(label.max())} of only {self.num_classes} classes")
        index = label * self.num_classes + prediction
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).reshape(self.matrix.shape)

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """IoU and accuracy of each class (NaN where undefined), as fractions."""
        matrix = self.matrix.double()
        true_positive = matrix.diag()
        labelled, predicted = matrix.sum(1), matrix.sum(0)
        union = labelled + predicted - true_positive
        return true_positive / union, true_positive / labelled

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "mAcc", "aAcc"}`` in percent."""
        iou, accuracy = self.per_class()
        total = self.matrix.sum()
        return {
            "mIoU": float(iou.nanmean()) * 100,
            "mAcc": float(accuracy.nanmean()) * 100,
            "aAcc": float(self.matrix.diag().sum().double() / total) * 100 if total else float("nan"),
        }
