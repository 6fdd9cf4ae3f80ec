"""GTSRB (Stallkamp et al., 2011) as a TFDS builder over the official archives, which TFDS does not ship.

Put these files (zipped, or extracted) in the manual directory
(`~/tensorflow_datasets/downloads/manual/` or `--manual_dir`):

    GTSRB_Final_Training_Images.zip   GTSRB/Final_Training/Images/<class:05d>/*.ppm
    GTSRB_Final_Test_Images.zip       GTSRB/Final_Test/Images/*.ppm
    GTSRB_Final_Test_GT.zip           GT-final_test.csv  (Filename;...;ClassId)

then build once (needs TensorFlow for writing, like every `tfds build`):

    python -c "import research.data.vision.gtsrb, tensorflow_datasets as tfds; \
        tfds.builder('gtsrb', file_format='array_record').download_and_prepare()"

Splits: train (39,209 images) and test (12,630), 43 classes; labels are the
class folder numbers of the official release.
"""
from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

LABEL_NAMES = tuple(str(i) for i in range(43))
_TRAIN = re.compile(r"(?:^|/)Final_Training/Images/(\d{5})/([^/]+\.ppm)$")
_TEST = re.compile(r"(?:^|/)Final_Test/Images/([^/]+\.ppm)$")
_TEST_LABELS = re.compile(r"(?:^|/)GT-final_test\.csv$")


def _files(root: str) -> dict[str, Callable[[], bytes]]:
  """Every file under `root` and inside the zip archives there: path -> reader of its bytes."""
  out: dict[str, Callable[[], bytes]] = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      if name.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        for member in archive.namelist():
          if not member.endswith("/"):
            out[f"{rel}!{member}"] = (lambda a=archive, m=member: a.read(m))
      else:
        out[rel] = (lambda p=path: open(p, "rb").read())
  return out


def _test_labels(files: dict[str, Callable[[], bytes]]) -> dict[str, int]:
  found = [k for k in files if _TEST_LABELS.search(k.split("!")[-1])]
  if not found:
    raise FileNotFoundError("GT-final_test.csv (in GTSRB_Final_Test_GT.zip) is missing from the manual "
                            "directory; it holds the test labels.")
  rows = csv.DictReader(io.StringIO(files[found[0]]().decode("utf-8")), delimiter=";")
  return {row["Filename"]: int(row["ClassId"]) for row in rows}


def iter_examples(root: str, split: str) -> Iterator[tuple[str, dict]]:
  """(key, {'image': uint8 [H, W, 3], 'label': int, 'file_name': str}) of one split, in a fixed order."""
  if split not in ("train", "test"):
    raise ValueError(f"GTSRB has splits 'train' and 'test', not {split!r}.")
  files = _files(root)
  labels = _test_labels(files) if split == "test" else None
  found = 0
  for key in sorted(files):
    name = key.split("!")[-1]
    if split == "train":
      m = _TRAIN.search(name)
      if not m:
        continue
      label, file_name = int(m.group(1)), m.group(2)
    else:
      m = _TEST.search(name)
      if not m:
        continue
      file_name = m.group(1)
      if file_name not in labels:
        raise KeyError(f"GTSRB test image {file_name} has no row in GT-final_test.csv.")
      label = labels[file_name]
    image = np.asarray(Image.open(io.BytesIO(files[key]())).convert("RGB"))
    found += 1
    yield f"{split}/{file_name}" if split == "test" else f"{split}/{label:05d}/{file_name}", {
        "image": image, "label": label, "file_name": file_name}
  if not found:
    raise FileNotFoundError(f"No GTSRB {split} images under {root}; see research.data.vision.gtsrb for "
                            "the files to put there.")


class Gtsrb(tfds.core.GeneratorBasedBuilder):
  """German Traffic Sign Recognition Benchmark, from the official archives (manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official final training and test sets."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=LABEL_NAMES),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://benchmark.ini.rub.de/gtsrb_news.html",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in ("train", "test")}

  def _generate_examples(self, root, split):
    yield from iter_examples(root, split)
