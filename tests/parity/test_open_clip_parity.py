"""Parity with open_clip: a randomly initialised ViT-B-32, converted by our converter, gives open_clip's embeddings.

Run by `make parity` (which builds .venv-parity with torch, torchvision,
open-clip-torch and this package); skipped elsewhere, including `make test`.
Requires CLIP_PARITY=1. The figures go to results/parity/clip_parity.json and
are printed.

Checked, for open_clip's 'ViT-B-32' (exact GELU) and 'ViT-B-32-quickgelu'
(OpenAI's activation), with every parameter perturbed so LayerNorm and bias
terms are not at their trivial initial values:
  * image and text embeddings: max |ours - open_clip| <= 1e-4 x the largest embedding norm;
  * token ids of our tokenizer == open_clip's (with and without ftfy);
  * CLIP's evaluation and training preprocessing, pixel for pixel;
  * the torch-file readers (state dict, pickled fine-tuned `ImageEncoder`,
    linearized encoder) and the parameter order of linearized encoders.
"""
import json
import os
import sys
import types

import numpy as np
import pytest

if not os.environ.get("CLIP_PARITY"):
  pytest.skip("open_clip parity runs only under `make parity` (CLIP_PARITY=1).", allow_module_level=True)
torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import jax.numpy as jnp  # noqa: E402

from research.data.vision import preprocess  # noqa: E402
from research.models import clip, clip_convert, clip_tokenizer  # noqa: E402

TOLERANCE = 1e-4
RESULTS = os.path.join("results", "parity", "clip_parity.json")
FIGURES: dict = {}

TEXTS = [
    "a photo of a cat.", "", "A PHOTO of the number: \"7\".",
    "it's a dog's life, isn't it? we're 'fine' you'll see I'm ok I'd go",
    "Ünïcödé façade naïve café — “curly” ‘quotes’ … 東京 ﬁne ｆｕｌｌ",
    "&amp;amp; &lt;b&gt; html", "12345 3.14 ½ Ⅻ ٣", "   lots   of\t\nwhitespace\u00a0here  ",
    "emoji 🐱🐶 👍🏽", "x" * 300, " ".join(["word"] * 100), "'sun 'Tis 'ſ",
    "!<end_of_text>x <start_of_text>", "a_b-c+d==e", "a centered satellite photo of annual crop land.",
    'a zoomed in photo of a "red and white circle 20 kph speed limit" traffic sign.',
]


def _record(key, value):
  FIGURES[key] = value
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(FIGURES, f, indent=2, sort_keys=True)
  print(f"{key}: {value}")


def _perturbed(name, seed=0):
  torch.manual_seed(seed)
  model = open_clip.create_model(name, pretrained=None).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model


def _to_ours(model, tmp_path, activation, towers=None):
  path = tmp_path / "state_dict.pt"
  torch.save(model.state_dict(), path)
  out = tmp_path / "ckpt"
  clip_convert.convert(str(path), str(out), activation=activation, towers=towers)
  return out


def _rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  diff = float(np.abs(ours - ref).max())
  norm = float(np.linalg.norm(ref, axis=-1).max())
  return diff, norm, diff / norm


@pytest.mark.parametrize("name,activation", [("ViT-B-32", "gelu"), ("ViT-B-32-quickgelu", "quick_gelu")])
def test_embeddings_match_open_clip(tmp_path, name, activation):
  model = _perturbed(name)
  ckpt = _to_ours(model, tmp_path, activation)
  ours, meta = clip_convert.load_model(str(ckpt))
  assert meta["config"]["activation"] == activation
  assert ours.config == clip.get_config(name)

  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, 3, 224, 224)).astype(np.float32)
  tokenizer = open_clip.get_tokenizer(name)
  ids = tokenizer(TEXTS).numpy()
  with torch.no_grad():
    ref_img = model.encode_image(torch.from_numpy(images)).numpy()
    ref_txt = model.encode_text(torch.from_numpy(ids)).numpy()
    ref_scale = float(model.logit_scale.exp())
  got_img = ours.encode_image(jnp.asarray(images.transpose(0, 2, 3, 1)))
  got_txt = ours.encode_text(jnp.asarray(ids, jnp.int32))
  img, txt = _rel(got_img, ref_img), _rel(got_txt, ref_txt)
  _record(f"{name}/image", {"max_abs_diff": img[0], "max_norm": img[1], "relative": img[2]})
  _record(f"{name}/text", {"max_abs_diff": txt[0], "max_norm": txt[1], "relative": txt[2]})
  assert img[2] <= TOLERANCE and txt[2] <= TOLERANCE
  assert clip.temperature(ours) == pytest.approx(ref_scale, rel=1e-6)


def test_tokenizer_ids_match_open_clip(monkeypatch):
  reference = open_clip.get_tokenizer("ViT-B-32")
  ours = clip_tokenizer.CLIPTokenizer()
  want = reference(TEXTS).numpy()
  got = ours.tokenize(TEXTS, 77)
  mismatched = [t for t, a, b in zip(TEXTS, want, got) if not (a == b).all()]
  # Without ftfy (our main environment has none) texts that ftfy leaves alone tokenize the same.
  import ftfy
  plain = [t for t in TEXTS if ftfy.fix_text(t) == t]
  monkeypatch.setitem(sys.modules, "ftfy", None)
  got_plain = ours.tokenize(plain, 77)
  mismatched_plain = [t for t, a, b in zip(plain, reference(plain).numpy(), got_plain) if not (a == b).all()]
  _record("tokenizer", {"texts": len(TEXTS), "mismatched": len(mismatched),
                        "texts_without_ftfy": len(plain), "mismatched_without_ftfy": len(mismatched_plain)})
  assert not mismatched and not mismatched_plain


def test_preprocessing_matches_open_clip_transforms():
  _, train_tf, eval_tf = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
  from PIL import Image
  rng = np.random.default_rng(0)
  worst = {"eval": 0.0, "train": 0.0}
  for h, w in ((300, 400), (224, 224), (500, 260), (28, 28), (64, 700)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = eval_tf(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    ours = np.asarray(clip.normalize_images(jnp.asarray(preprocess.eval_image(image, 224))))
    worst["eval"] = max(worst["eval"], float(np.abs(ours - ref).max()))
    # The training transform draws from torch's RNG: replay the same draws in ours.
    torch.manual_seed(h * w)
    ref = train_tf(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    torch.manual_seed(h * w)
    ours = np.asarray(clip.normalize_images(jnp.asarray(preprocess.train_image(image, _TorchRng(), 224))))
    worst["train"] = max(worst["train"], float(np.abs(ours - ref).max()))
  _record("preprocess_max_abs_diff", worst)
  assert worst["eval"] < 1e-5 and worst["train"] < 1e-5


class _TorchRng:
  """The `np.random.Generator` calls `random_crop_box` makes, served by torch's RNG as torchvision draws them."""

  def uniform(self, lo, hi):
    return float(torch.empty(1).uniform_(lo, hi).item())

  def integers(self, lo, hi):
    return int(torch.randint(lo, hi, size=(1,)).item())


def test_fine_tuned_image_encoders_convert(tmp_path):
  """The task-vector papers' checkpoints: pickled `ImageEncoder`s (text transformer deleted), and linearized ones."""
  model = _perturbed("ViT-B-32-quickgelu", seed=1)
  modeling = types.ModuleType("src.modeling")

  class ImageEncoder(torch.nn.Module):
    def __init__(self, clip_model):
      super().__init__()
      self.model = clip_model
      delattr(self.model, "transformer")

  ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
  modeling.ImageEncoder = ImageEncoder
  sys.modules["src"], sys.modules["src.modeling"] = types.ModuleType("src"), modeling
  encoder = ImageEncoder(model)
  torch.save(encoder, tmp_path / "finetuned.pt")
  names = [n for n, _ in encoder.named_parameters()]
  flat = list(encoder.parameters())
  del sys.modules["src"], sys.modules["src.modeling"]   # the class is gone, as in a fresh process

  # Parameter order of the linearized encoders, against torch's own.
  config = clip.get_config("ViT-B-32-quickgelu")
  assert names == ["model." + k for k, _ in clip_convert.linearized_names(config)]

  images = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref = model.encode_image(torch.from_numpy(images)).numpy()
  x = jnp.asarray(images.transpose(0, 2, 3, 1))

  with pytest.raises(ValueError, match="allow_pickle"):
    clip_convert.convert(str(tmp_path / "finetuned.pt"), str(tmp_path / "refused"))
  clip_convert.convert(str(tmp_path / "finetuned.pt"), str(tmp_path / "ft"), allow_pickle=True)
  params, cfg = clip_convert.load_image_params(str(tmp_path / "ft"))
  apply_fn, _ = clip.split_image_encoder(clip.abstract(cfg))
  pickled = _rel(apply_fn(params, x), ref)

  lin = {f"model.params.{i}": p.detach() for i, p in enumerate(flat)}
  lin.update({f"model.params0.{i}": torch.zeros_like(p) for i, p in enumerate(flat)})
  torch.save(lin, tmp_path / "linear_finetuned.pt")
  clip_convert.convert(str(tmp_path / "linear_finetuned.pt"), str(tmp_path / "lin"))
  params, _ = clip_convert.load_image_params(str(tmp_path / "lin"))
  linear = _rel(apply_fn(params, x), ref)
  _record("fine_tuned_encoders", {"pickled_module_relative": pickled[2], "linearized_relative": linear[2]})
  assert pickled[2] <= TOLERANCE and linear[2] <= TOLERANCE
