"""Image tasks of the tangent-space paper: TFDS data sources with the paper's splits, CLIP preprocessing, zero-shot prompts.

    from research.data import vision
    splits = vision.load_splits("EuroSAT", data_dir=...)        # {'train', 'val', 'test'}: Split
    for batch in vision.train_batches(splits["train"], 128, seed=0, steps=1000):
      ...   # {'image': uint8 [B_local, 224, 224, 3], 'label': int32 [B_local]}
    names, prompts = vision.class_names("EuroSAT"), vision.templates("EuroSAT")

Nothing is read at import time. See research/models/CLIP.md for preparing the datasets.
"""
from research.data.vision.datasets import (CONTROL, DATASETS, MANUAL, TASKS, ConcatSource, Split,
                                           VisionDataset, class_names, get, label_names, load_splits,
                                           split_indices, templates)
from research.data.vision.pipeline import eval_arrays, eval_batches, num_steps, train_batches
from research.data.vision.preprocess import eval_image, train_image

__all__ = [
    "CONTROL", "ConcatSource", "DATASETS", "MANUAL", "Split", "TASKS", "VisionDataset", "class_names",
    "eval_arrays", "eval_batches", "eval_image", "get", "label_names", "load_splits", "num_steps", "split_indices",
    "templates", "train_batches", "train_image",
]
