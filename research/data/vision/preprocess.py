"""CLIP's image preprocessing on the host, in numpy + Pillow, pixel-exact with open_clip's transforms.

Evaluation: resize the shorter side to `size` (bicubic), center-crop
`size` x `size`. Training (the tangent-space paper fine-tunes with open_clip's
training transform): a random resized crop covering 90-100% of the image area
with aspect ratio in [3/4, 4/3], resized to `size` (bicubic). Grey images
become RGB. Both return uint8 [size, size, 3]; the model normalises on device
(`research.models.clip.normalize_images`), so batches cross to the
accelerator as bytes.

Pillow does the resizing, as torchvision does for PIL images, so the crops
equal open_clip's (tests/parity checks it).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


def to_pil_rgb(image: np.ndarray) -> Image.Image:
  """uint8 [H, W], [H, W, 1] or [H, W, 3] -> an RGB PIL image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"Expected a uint8 image, got {image.dtype}; decode images to uint8 RGB first.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Expected an image [H, W] or [H, W, 1 or 3], got shape {image.shape}.")
  return Image.fromarray(image, "RGB")


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize so the shorter side is `size`; the longer side is truncated as torchvision does."""
  w, h = image.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  return image if new == (w, h) else image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  w, h = image.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def eval_image(image: np.ndarray, size: int = 224) -> np.ndarray:
  """CLIP's evaluation preprocessing: uint8 [size, size, 3]."""
  return np.asarray(center_crop(resize_shorter(to_pil_rgb(image), size), size))


def random_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float] = TRAIN_SCALE,
                    ratio: tuple[float, float] = TRAIN_RATIO) -> tuple[int, int, int, int]:
  """(left, top, crop width, crop height) of a random resized crop, by torchvision's sampling rule.

  Up to ten draws of an area fraction in `scale` and a log-uniform aspect
  ratio in `ratio`; the first box that fits is taken. Failing that, the
  largest centred box whose aspect ratio is clipped to `ratio`.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_image(image: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
  """The paper's training preprocessing (open_clip's train transform): uint8 [size, size, 3]."""
  pil = to_pil_rgb(image)
  left, top, w, h = random_crop_box(pil.size[0], pil.size[1], rng)
  # Crop, then resize (resize's `box=` would let the filter read pixels outside the crop).
  return np.asarray(pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
