"""Tests of research.data.vision: the paper's splits, CLIP preprocessing, per-process batches, class names, GTSRB."""
import io
import os
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from research.data import vision
from research.data.vision import classnames, gtsrb, preprocess


# --- splits -------------------------------------------------------------------------------


def test_split_indices_are_disjoint_deterministic_and_sized_as_in_the_paper():
  a, b = vision.split_indices(31500, test_fraction=0.2), vision.split_indices(31500, test_fraction=0.2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert {k: len(v) for k, v in a.items()} == {"test": 6300, "val": 2520, "train": 22680}
  union = np.concatenate(list(a.values()))
  assert len(np.unique(union)) == 31500
  big = vision.split_indices(76128 + 10875)   # SUN397 train + validation: validation capped at 5,000
  assert len(big["val"]) == 5000 and "test" not in big
  assert not np.array_equal(vision.split_indices(1000, seed=1)["val"], vision.split_indices(1000)["val"])
  with pytest.raises(ValueError, match="test_fraction"):
    vision.split_indices(100, test_fraction=1.0)


def test_concat_source_reads_across_parts():
  source = vision.ConcatSource([["a", "b"], [], ["c"]])
  assert len(source) == 3 and [source[i] for i in range(3)] == ["a", "b", "c"]
  with pytest.raises(IndexError):
    source[3]


def test_every_dataset_loads_on_mock_data_with_the_papers_splits():
  for name, spec in vision.DATASETS.items():
    with tfds.testing.mock_data(num_examples=50):
      splits = vision.load_splits(name)
    assert set(splits) == {"train", "val", "test"}
    pool = 100 if spec.pool_splits == ("train", "validation") else 50
    carved = int(round(spec.test_fraction * pool))
    assert len(splits["train"]) + len(splits["val"]) + carved == pool
    assert len(splits["test"]) == (carved if spec.test_split is None else 50)
    example = splits["train"].example(0)
    assert example["image"].dtype == np.uint8 and 0 <= int(example["label"]) < len(vision.label_names(name))


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build"):
    vision.load_splits("MNIST", data_dir=str(tmp_path))


# --- preprocessing ------------------------------------------------------------------------


def test_eval_preprocessing_by_hand():
  image = np.zeros((4, 8, 3), np.uint8)
  image[:, 2:6] = 200            # a bright centre band on a wide image
  out = preprocess.eval_image(image, 4)
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  # Shorter side already 4: no resize; the centre crop is exactly the band.
  np.testing.assert_array_equal(out, image[:, 2:6])
  grey = preprocess.eval_image(np.full((10, 10, 1), 7, np.uint8), 5)
  assert grey.shape == (5, 5, 3) and (grey == 7).all()
  with pytest.raises(TypeError, match="uint8"):
    preprocess.eval_image(np.zeros((4, 4, 3), np.float32), 4)


def test_resize_shorter_side_truncates_like_torchvision():
  assert preprocess.resize_shorter(Image.new("RGB", (400, 300)), 224).size == (298, 224)
  assert preprocess.resize_shorter(Image.new("RGB", (260, 500)), 224).size == (224, 430)


def test_random_crop_box_respects_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
    left, top, cw, ch = preprocess.random_crop_box(w, h, rng)
    assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
  # A very wide image cannot fit the ratio range: the centred fallback clips the ratio to 4/3.
  assert preprocess.random_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)
  out = preprocess.train_image(np.zeros((50, 60, 3), np.uint8), np.random.default_rng(0), 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# --- batches --------------------------------------------------------------------------------


class FakeSource:
  """Example i is an image filled with i % 256, label i % 7."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((12, 10, 3), i % 256, np.uint8), "label": i % 7}


def test_process_slices_add_up_to_the_global_batch():
  split = vision.Split(FakeSource(30), np.arange(5, 30))
  kw = dict(seed=3, steps=4, image_size=8, num_threads=1, prefetch=0)
  whole = list(vision.train_batches(split, 8, process_index=0, process_count=1, **kw))
  parts = [list(vision.train_batches(split, 8, process_index=p, process_count=2, **kw)) for p in (0, 1)]
  for step, batch in enumerate(whole):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])
    assert batch["image"].shape == (8, 8, 8, 3)
  resumed = list(vision.train_batches(split, 8, start_step=2, process_index=0, process_count=1, **kw))
  np.testing.assert_array_equal(resumed[0]["image"], whole[2]["image"])
  threaded = list(vision.train_batches(split, 8, process_index=0, process_count=1,
                                       **{**kw, "num_threads": 4, "prefetch": 2}))
  np.testing.assert_array_equal(threaded[3]["image"], whole[3]["image"])
  with pytest.raises(ValueError, match="divisible"):
    next(iter(vision.train_batches(split, 7, process_index=0, process_count=2, **kw)))


def test_eval_batches_cover_every_example_once_with_a_mask():
  split = vision.Split(FakeSource(11), np.arange(11))
  batches = list(vision.eval_batches(split, 4, image_size=8, process_index=0, process_count=1,
                                     num_threads=1, prefetch=0))
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(11) % 7)
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 3]


def test_num_steps_counts_full_batches():
  assert vision.num_steps(vision.Split(FakeSource(10), np.arange(10)), 4, epochs=3) == 7


# --- class names and templates --------------------------------------------------------------


def test_class_names_follow_tfds_label_order_and_counts():
  counts = {"Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "MNIST": 10, "RESISC45": 45, "SUN397": 397,
            "SVHN": 10}
  for name, count in counts.items():
    names = vision.class_names(name)
    assert len(names) == count and all(isinstance(n, str) and n for n in names), name
  assert vision.class_names("EuroSAT")[2] == "brushland or shrubland"
  assert vision.class_names("RESISC45")[2] == "baseball diamond"
  assert vision.class_names("SUN397")[0] == "abbey"
  assert vision.class_names("GTSRB")[14] == "stop"


def test_imagenet_names_come_from_wordnet():
  if not os.path.isfile("/usr/share/wordnet/data.noun"):
    pytest.skip("Debian wordnet-base is not installed (make data).")
  names = vision.class_names("ImageNet")
  assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
  with pytest.raises(FileNotFoundError, match="wordnet-base"):
    classnames.imagenet_name("n01440764", wordnet_root="/nonexistent")


def test_templates_have_one_placeholder():
  for name in vision.DATASETS:
    prompts = vision.templates(name)
    assert prompts and all(t.count("{}") == 1 for t in prompts), name
  assert len(vision.templates("ImageNet")) == 80 and len(set(vision.templates("ImageNet"))) == 80
  assert len(vision.templates("RESISC45")) == 18


# --- GTSRB ------------------------------------------------------------------------------------


def _ppm(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(buffer, format="PPM")
  return buffer.getvalue()


def test_gtsrb_reads_the_official_archives(tmp_path):
  with zipfile.ZipFile(tmp_path / "GTSRB_Final_Training_Images.zip", "w") as z:
    z.writestr("GTSRB/Final_Training/Images/00000/00000_00000.ppm", _ppm(10))
    z.writestr("GTSRB/Final_Training/Images/00042/00001_00002.ppm", _ppm(20))
    z.writestr("GTSRB/Final_Training/Images/00042/GT-00042.csv", "Filename;ClassId\n")
  # The test images extracted, their labels zipped.
  images = tmp_path / "GTSRB" / "Final_Test" / "Images"
  images.mkdir(parents=True)
  (images / "00000.ppm").write_bytes(_ppm(30))
  (images / "00001.ppm").write_bytes(_ppm(40))
  with zipfile.ZipFile(tmp_path / "GTSRB_Final_Test_GT.zip", "w") as z:
    z.writestr("GT-final_test.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                    "00000.ppm;5;6;0;0;4;5;16\n00001.ppm;5;6;0;0;4;5;1\n")
  train = list(gtsrb.iter_examples(str(tmp_path), "train"))
  assert [(ex["label"], int(ex["image"][0, 0, 0])) for _, ex in train] == [(0, 10), (42, 20)]
  test = list(gtsrb.iter_examples(str(tmp_path), "test"))
  assert [(ex["label"], ex["file_name"]) for _, ex in test] == [(16, "00000.ppm"), (1, "00001.ppm")]
  assert test[0][1]["image"].shape == (6, 5, 3)
  with pytest.raises(FileNotFoundError, match="GTSRB train"):
    list(gtsrb.iter_examples(str(tmp_path / "GTSRB" / "Final_Test"), "train"))


def test_gtsrb_builder_works_with_tfds_mock_data():
  with tfds.testing.mock_data(num_examples=5):
    source = tfds.data_source("gtsrb", split="test")
    assert len(source) == 5 and 0 <= int(source[0]["label"]) < 43
