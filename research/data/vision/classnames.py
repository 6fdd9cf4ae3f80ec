"""Class names and CLIP prompt templates of the tangent-space paper's image tasks (zero-shot heads).

Names are given per TFDS label name, so the head's row order always follows
the dataset's label ids (read from the TFDS builder, see `datasets.class_names`).
Templates are the per-dataset prompt sets that CLIP's authors published and
the task-vector papers reuse: short, hand-written descriptions of the kind of
photo, each with one `{}` for the class name.
"""
from __future__ import annotations

import os

# ---------------------------------------------------------------------------------------
# Prompt templates.

_NUMBER = ('a photo of the number: "{}".',)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "Cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
             "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
             "a photo of my old {}."),
    "DTD": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."),
    "EuroSAT": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "GTSRB": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "MNIST": _NUMBER,
    "RESISC45": tuple(f"{kind} {view} of {article}{{}}."
                      for article in ("", "a ", "the ")
                      for kind, view in (("satellite", "imagery"), ("aerial", "imagery"),
                                         ("satellite", "photo"), ("aerial", "photo"),
                                         ("satellite", "view"), ("aerial", "view"))),
    "SUN397": ("a photo of a {}.", "a photo of the {}."),
    "SVHN": _NUMBER,
}

# CLIP's 80 ImageNet prompts: photo qualities and renditions of the object.
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a bad photo of the {}.', 'a sculpture of a {}.', 'a sculpture of the {}.',
    'a photo of a hard to see {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of a {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'a rendering of the {}.', 'graffiti of a {}.', 'graffiti of the {}.', 'a cropped photo of a {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'a tattoo of the {}.', 'a embroidered {}.',
    'the embroidered {}.', 'a bright photo of a {}.', 'a bright photo of the {}.',
    'a photo of a clean {}.', 'a photo of the clean {}.', 'a photo of a dirty {}.',
    'a photo of the dirty {}.', 'a dark photo of a {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a drawing of the {}.', 'a plastic {}.', 'the plastic {}.',
    'a photo of a cool {}.', 'a photo of the cool {}.', 'a close-up photo of a {}.',
    'a close-up photo of the {}.', 'a black and white photo of a {}.',
    'a black and white photo of the {}.', 'a painting of a {}.', 'a painting of the {}.',
    'a pixelated photo of a {}.', 'a pixelated photo of the {}.', 'a jpeg corrupted photo of a {}.',
    'a jpeg corrupted photo of the {}.', 'a blurry photo of a {}.', 'a blurry photo of the {}.',
    'a photo of a {}.', 'a photo of the {}.', 'a good photo of a {}.', 'a good photo of the {}.',
    'a {} in a video game.', 'the {} in a video game.', 'a doodle of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'the origami {}.', 'a sketch of a {}.', 'a sketch of the {}.', 'a toy {}.',
    'the toy {}.', 'a rendition of a {}.', 'a rendition of the {}.', 'a photo of a large {}.',
    'a photo of the large {}.', 'a photo of a nice {}.', 'a photo of the nice {}.',
    'a photo of a weird {}.', 'a photo of the weird {}.', 'a cartoon {}.', 'the cartoon {}.',
    'art of a {}.', 'art of the {}.', 'itap of a {}.', 'itap of the {}.', 'a plushie {}.',
    'the plushie {}.', 'a photo of a small {}.', 'a photo of the small {}.', 'a photo of many {}.',
    'a photo of my {}.', 'itap of my {}.', 'a photo of one {}.',
)


# ---------------------------------------------------------------------------------------
# Class names: TFDS label name -> the name put into the prompts.

EUROSAT = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river",
    "SeaLake": "lake or sea",
}

# GTSRB class ids 0-42 (the official archive's folder numbers), described as the signs look.
GTSRB = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning", "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way", "stop", "empty red and white circle",
    "red and white circle no truck entry", "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning", "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning", "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory", "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory", "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

# RESISC45 and DTD label names are the class names once underscores are spaces.
_UNDERSCORE_TO_SPACE = ("RESISC45", "DTD")


def sun397_name(label: str) -> str:
  """'/a/apartment_building/outdoor' -> 'apartment building outdoor'."""
  parts = label.strip("/").split("/")[1:]
  return " ".join(parts).replace("_", " ")


def imagenet_name(wnid: str, wordnet_root: str = "/usr/share/wordnet") -> str:
  """An ImageNet synset id (n01440764) -> the first lemma of that WordNet noun synset ('tench').

  ImageNet's classes are WordNet 3.0 synsets and the id is the synset's offset
  in `data.noun` (Debian `wordnet-base`). OpenAI's hand-edited ImageNet names
  (e.g. for duplicate lemmas such as 'crane') give about a point more zero-shot
  accuracy; this is only the negation control task, so the plain lemmas do.
  """
  table = _wordnet_lemmas(wordnet_root)
  if wnid not in table:
    raise KeyError(f"ImageNet synset {wnid} not found in {wordnet_root}/data.noun.")
  return table[wnid]


_LEMMAS: dict[str, dict[str, str]] = {}


def _wordnet_lemmas(root: str) -> dict[str, str]:
  if root not in _LEMMAS:
    path = os.path.join(root, "data.noun")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: install Debian's wordnet-base (`make data`) or pass "
                              "wordnet_root= to a WordNet 3.0 dict folder; ImageNet class names come from it.")
    table = {}
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("  "):   # licence header
          continue
        fields = line.split(" ")
        table["n" + fields[0]] = fields[4].replace("_", " ")
    _LEMMAS[root] = table
  return _LEMMAS[root]


def display_name(dataset: str, label: str) -> str:
  """The prompt name of one TFDS label name of `dataset`."""
  if dataset == "EuroSAT":
    return EUROSAT[label]
  if dataset == "GTSRB":
    return GTSRB[int(label)]
  if dataset == "SUN397":
    return sun397_name(label)
  if dataset == "ImageNet":
    return imagenet_name(label)
  if dataset in _UNDERSCORE_TO_SPACE:
    return label.replace("_", " ")
  return label   # Cars (make model type year), MNIST and SVHN (digits)


def templates(dataset: str) -> tuple[str, ...]:
  if dataset not in TEMPLATES:
    raise KeyError(f"No prompt templates for {dataset!r}; known: {sorted(TEMPLATES)}.")
  return TEMPLATES[dataset]


TEMPLATES["ImageNet"] = IMAGENET_TEMPLATES
