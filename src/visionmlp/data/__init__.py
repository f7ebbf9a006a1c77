"""Data sets, transforms and loaders for training and evaluation."""

from .datasets import DATASETS, DataError, DigitsDataset, SampleError, build_dataset, subset_evenly
from .loader import build_batch_transform, build_loader, build_transform, collate_readable

__all__ = [
    "DATASETS", "DataError", "DigitsDataset", "SampleError", "build_batch_transform", "build_dataset", "build_loader",
    "build_transform", "collate_readable", "subset_evenly",
]
