"""The tangent-space paper's eight image tasks and the ImageNet control as TFDS data sources, with the paper's splits.

Data are read with `tfds.data_source` (random access to ArrayRecord files,
decoding in numpy, no TensorFlow at training time; preparing a dataset once
with `tfds build` does need TensorFlow, see research/models/CLIP.md). A
split is a data source plus an index array, so the validation split the
paper uses, a held-out part of the training data, is just indices:

  * train pool: the TFDS splits the paper trains on (DTD: train + validation);
  * test: the TFDS test split; EuroSAT and RESISC45 have none in TFDS, so a
    seeded, fixed part of the pool is held out as test first (10% and 20%:
    2,700 and 6,300 examples, the test sizes of the splits the task-vector
    papers used);
  * validation: 10% of the remaining pool, at most 5,000 examples, drawn with
    a fixed seed (the task-vector code's `split_train_into_train_val`);
    train is the rest.

The indices depend only on the pool size and the seed, never on the number
of processes, so every host of a pod sees the same splits.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from research.data.vision import classnames

VAL_FRACTION = 0.1
MAX_VAL = 5000


@dataclasses.dataclass(frozen=True)
class VisionDataset:
  """How one task maps onto TFDS, and its fine-tuning length in the paper."""
  name: str                        # the paper's name
  tfds_name: str
  pool_splits: tuple[str, ...]     # TFDS splits pooled for train + validation (+ test when carved)
  test_split: str | None           # None: carve `test_fraction` of the pool out as test
  test_fraction: float = 0.0
  epochs: int = 0                  # the paper's fine-tuning epochs (0: not fine-tuned, control only)
  manual: bool = False             # TFDS needs files downloaded by hand (see MANUAL)


DATASETS: dict[str, VisionDataset] = {
    "Cars": VisionDataset("Cars", "cars196", ("train",), "test", epochs=35),
    "DTD": VisionDataset("DTD", "dtd", ("train", "validation"), "test", epochs=76),
    "EuroSAT": VisionDataset("EuroSAT", "eurosat/rgb", ("train",), None, test_fraction=0.1, epochs=12),
    "GTSRB": VisionDataset("GTSRB", "gtsrb", ("train",), "test", epochs=11, manual=True),
    "MNIST": VisionDataset("MNIST", "mnist", ("train",), "test", epochs=5),
    "RESISC45": VisionDataset("RESISC45", "resisc45", ("train",), None, test_fraction=0.2, epochs=15,
                              manual=True),
    "SUN397": VisionDataset("SUN397", "sun397/tfds", ("train", "validation"), "test", epochs=14),
    "SVHN": VisionDataset("SVHN", "svhn_cropped", ("train",), "test", epochs=4),
    "ImageNet": VisionDataset("ImageNet", "imagenet2012", ("train",), "validation", manual=True),
}
TASKS = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
CONTROL = "ImageNet"

MANUAL = {
    "GTSRB": "GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
             "from the benchmark's site (research.data.vision.gtsrb)",
    "RESISC45": "NWPU-RESISC45.rar from the dataset's authors, extracted (TFDS 'resisc45')",
    "ImageNet": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (TFDS 'imagenet2012')",
}


def get(name: str) -> VisionDataset:
  if name not in DATASETS:
    raise KeyError(f"Unknown image dataset {name!r}; known: {sorted(DATASETS)}.")
  return DATASETS[name]


@dataclasses.dataclass(frozen=True)
class Split:
  """Examples `source[indices[i]]`; `source` is any random-access sequence of TFDS example dicts."""
  source: Any
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def example(self, i: int) -> Mapping[str, Any]:
    return self.source[int(self.indices[i])]


class ConcatSource:
  """Several data sources read as one (e.g. DTD's train + validation)."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> Mapping[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} examples")
    k = int(np.searchsorted(self.offsets, i, side="right")) - 1
    return self.sources[k][int(i - self.offsets[k])]


def split_indices(pool_size: int, test_fraction: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
  """train / val (/ test) indices into a pool of `pool_size` examples, as described in the module docstring.

  >>> {k: len(v) for k, v in split_indices(1000, test_fraction=0.1).items()}
  {'test': 100, 'val': 90, 'train': 810}
  """
  if pool_size < 3:
    raise ValueError(f"A pool of {pool_size} examples cannot be split into train and validation.")
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction={test_fraction} must be in [0, 1).")
  out = {}
  rest = np.arange(pool_size)
  test_size = int(round(test_fraction * pool_size))
  if test_size:
    perm = np.random.default_rng([seed, 1]).permutation(pool_size)
    out["test"], rest = np.sort(perm[:test_size]), np.sort(perm[test_size:])
  n_val = max(1, min(int(VAL_FRACTION * len(rest)), MAX_VAL))
  perm = np.random.default_rng([seed, 2]).permutation(len(rest))
  out["val"], out["train"] = np.sort(rest[perm[:n_val]]), np.sort(rest[perm[n_val:]])
  return out


def _open(tfds_name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds
  if tfds_name == "gtsrb":
    from research.data.vision import gtsrb  # noqa: F401  (registers the builder)
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types for a missing or unprepared dataset
    raise FileNotFoundError(
        f"TFDS dataset {tfds_name!r} split {split!r} is not prepared under data_dir={data_dir or '~/tensorflow_datasets'} "
        f"({type(e).__name__}: {e}). Prepare it once in ArrayRecord format, e.g. "
        f"`tfds build {tfds_name} --file_format=array_record` (see research/models/CLIP.md).") from e


def load_splits(name: str, *, data_dir: str | None = None, seed: int = 0) -> dict[str, Split]:
  """{'train', 'val', 'test'} `Split`s of one dataset, as the paper uses them."""
  spec = get(name)
  pool = [_open(spec.tfds_name, s, data_dir) for s in spec.pool_splits]
  pool = pool[0] if len(pool) == 1 else ConcatSource(pool)
  idx = split_indices(len(pool), spec.test_fraction if spec.test_split is None else 0.0, seed)
  out = {"train": Split(pool, idx["train"]), "val": Split(pool, idx["val"])}
  if spec.test_split is None:
    out["test"] = Split(pool, idx["test"])
  else:
    test = _open(spec.tfds_name, spec.test_split, data_dir)
    out["test"] = Split(test, np.arange(len(test)))
  return out


def label_names(name: str) -> list[str]:
  """The TFDS label names of a dataset, in label-id order (from the builder's metadata, no data needed)."""
  spec = get(name)
  if spec.tfds_name == "gtsrb":
    from research.data.vision import gtsrb
    return list(gtsrb.LABEL_NAMES)
  import tensorflow_datasets as tfds
  return list(tfds.builder(spec.tfds_name, data_dir=None).info.features["label"].names)


def class_names(name: str) -> list[str]:
  """The prompt names of a dataset's classes, in label-id order (for `heads.zeroshot_head`)."""
  return [classnames.display_name(name, label) for label in label_names(name)]


def templates(name: str) -> tuple[str, ...]:
  return classnames.templates(name)
