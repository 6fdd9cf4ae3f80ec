r"""Converts an OpenAI / open_clip CLIP checkpoint (or a fine-tuned image encoder) to an Orbax checkpoint.

  python -m experiments.convert_clip --source=ViT-B-32.pt --out=/ckpt/clip-b32
  python -m experiments.convert_clip --source=checkpoints/ViT-B-32/CarsVal/finetuned.pt \
      --out=/ckpt/b32-cars-standard --allow_pickle
  python -m experiments.convert_clip --source=ViT-B-32:openai --out=/ckpt/clip-b32   # needs open_clip + network

`--source` is a file (.pt / .pth / .bin need torch; .safetensors / .npz do
not) or `MODEL:PRETRAINED` (open_clip's names; open_clip downloads the
weights). It prints the architecture and the number of parameters written.
See research/models/CLIP.md.
"""
import os

import jax
from absl import app, flags, logging

from research.models import clip_convert

_SOURCE = flags.DEFINE_string("source", None, "Checkpoint file, or open_clip MODEL:PRETRAINED.", required=True)
_OUT = flags.DEFINE_string("out", None, "Orbax checkpoint directory to write (step 0).", required=True)
_ACTIVATION = flags.DEFINE_enum("activation", "quick_gelu", ["quick_gelu", "gelu"],
                                "quick_gelu for OpenAI's weights and models fine-tuned from them.")
_TOWERS = flags.DEFINE_list("towers", None, "visual,text (default: both when the text tower is present).")
_POINT = flags.DEFINE_enum("linearized_point", "params", ["params", "params0"],
                           "For linearized encoders: the fine-tuned point or the expansion point.")
_HEAD_WIDTH = flags.DEFINE_integer("head_width", 64, "Attention head width (64 in every OpenAI / open_clip ViT).")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False,
                                  "Allow unpickling whole torch modules (runs code from the file).")


def _open_clip_state_dict(spec):
  import open_clip  # pylint: disable=import-outside-toplevel
  name, pretrained = spec.split(":", 1)
  model = open_clip.create_model(name, pretrained=pretrained)
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def main(argv):
  del argv
  source = _SOURCE.value
  if not os.path.exists(source) and ":" in source:
    source = _open_clip_state_dict(source)
  config = clip_convert.convert(source, _OUT.value, activation=_ACTIVATION.value, towers=_TOWERS.value,
                                head_width=_HEAD_WIDTH.value, linearized_point=_POINT.value,
                                allow_pickle=_ALLOW_PICKLE.value)
  params, _, meta = clip_convert.restore(_OUT.value)
  count = sum(x.size for x in jax.tree.leaves(params))
  logging.info("Wrote %s: towers %s, %d parameters, %s", _OUT.value, meta["towers"], count, config)
  print(f"{_OUT.value}: towers={meta['towers']} parameters={count} config={config.to_dict()}")


if __name__ == "__main__":
  app.run(main)
