"""Converting OpenAI / open_clip CLIP state dicts to our Param tree and Orbax checkpoints, and back.

Layouts read (keys as open_clip's `CLIP.state_dict()`; a common prefix such
as `model.` or `module.` is stripped):

  * open_clip / OpenAI state dicts: `visual.conv1.weight`, `visual.transformer.resblocks.<i>.attn.in_proj_weight`,
    `token_embedding.weight`, `text_projection`, `logit_scale`, ...;
  * the fine-tuned image encoders published with the task-vector papers
    (`ImageEncoder` modules holding an open_clip model under `model.`, text
    transformer deleted): converted with `towers=('visual',)`;
  * the tangent-space paper's linearized encoders (`model.params.<i>` /
    `model.params0.<i>`, a flat list in the module's parameter order):
    see `unflatten_linearized`.

Files read by `load_state_dict`: `.npz` and `.safetensors` without torch;
torch files (`.pt`, `.pth`, `.bin`: state dicts, open_clip training
checkpoints, OpenAI's TorchScript archives, pickled modules) need torch,
which is imported only there.

Torch conventions undone here: `Linear.weight` is [out, in] (our kernels are
[in, out]); attention keeps q, k, v in one `in_proj_weight` [3 width, width]
(we keep three Linears); the patch convolution is OIHW (ours HWIO).

An Orbax checkpoint written by `save` holds the Param tree as nested dicts
(step 0 by default) and metadata `{'format', 'config', 'towers', 'source'}`;
`restore` reads it back, straight into target shardings when given a mesh and
logical-axis rules.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import types
import zipfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from research.models import clip

FORMAT = "research.clip/v1"
TOWERS = ("visual", "text")
# Entries of OpenAI's state dicts that are not parameters.
IGNORED_KEYS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask", "logit_bias"})
_ANCHOR = "visual.conv1.weight"


# --------------------------------------------------------------------------------------
# The key table: one entry per (our leaf, torch tensor) pair.


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[Any, ...]     # our leaf path in the pure-dict Param tree
  key: str                  # torch state-dict key
  kind: str = "copy"        # copy | linear (transpose) | conv (OIHW <-> HWIO) | qkv
  part: int = 0             # for qkv: 0 query, 1 key, 2 value


def _block_entries(tower: str, prefix: str, layers: int) -> list[_Entry]:
  out = []
  for i in range(layers):
    ours, theirs = (tower, "blocks", i), f"{prefix}transformer.resblocks.{i}."
    for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out += [_Entry(ours + (norm, "scale"), theirs + f"{ln}.weight"),
              _Entry(ours + (norm, "bias"), theirs + f"{ln}.bias")]
    for part, name in enumerate(("query", "key", "value")):
      out += [_Entry(ours + ("attn", name, "kernel"), theirs + "attn.in_proj_weight", "qkv", part),
              _Entry(ours + ("attn", name, "bias"), theirs + "attn.in_proj_bias", "qkv", part)]
    for mine, torch_name in (("attn", "attn.out_proj"), ("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
      path = ours + (("attn", "out") if mine == "attn" else (mine,))
      out += [_Entry(path + ("kernel",), theirs + f"{torch_name}.weight", "linear"),
              _Entry(path + ("bias",), theirs + f"{torch_name}.bias")]
  return out


def entries(config: clip.CLIPConfig, towers: Sequence[str] = TOWERS) -> list[_Entry]:
  """The full mapping between our Param leaves and open_clip's keys, for the given towers."""
  _check_towers(towers)
  out = []
  if "visual" in towers:
    out += [_Entry(("visual", "patch_embed", "kernel"), "visual.conv1.weight", "conv"),
            _Entry(("visual", "class_embedding"), "visual.class_embedding"),
            _Entry(("visual", "position_embedding"), "visual.positional_embedding"),
            _Entry(("visual", "pre_norm", "scale"), "visual.ln_pre.weight"),
            _Entry(("visual", "pre_norm", "bias"), "visual.ln_pre.bias")]
    out += _block_entries("visual", "visual.", config.vision_layers)
    out += [_Entry(("visual", "post_norm", "scale"), "visual.ln_post.weight"),
            _Entry(("visual", "post_norm", "bias"), "visual.ln_post.bias"),
            _Entry(("visual", "proj"), "visual.proj")]
  if "text" in towers:
    out += [_Entry(("text", "token_embedding", "embedding"), "token_embedding.weight"),
            _Entry(("text", "position_embedding"), "positional_embedding")]
    out += _block_entries("text", "", config.text_layers)
    out += [_Entry(("text", "final_norm", "scale"), "ln_final.weight"),
            _Entry(("text", "final_norm", "bias"), "ln_final.bias"),
            _Entry(("text", "proj"), "text_projection"),
            _Entry(("logit_scale",), "logit_scale")]
  return out


def _check_towers(towers: Sequence[str]) -> None:
  bad = [t for t in towers if t not in TOWERS]
  if bad or not towers:
    raise ValueError(f"towers={tuple(towers)}; use a non-empty subset of {TOWERS}.")


# --------------------------------------------------------------------------------------
# State dict <-> Param tree.


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes the prefix in front of `visual.conv1.weight` (e.g. 'model.', 'module.') from every key.

  Keys without that prefix are dropped (e.g. a classification head stored
  beside the encoder).
  """
  anchors = [k for k in state_dict if k == _ANCHOR or k.endswith("." + _ANCHOR)]
  if len(anchors) != 1:
    raise KeyError(f"Expected exactly one '{_ANCHOR}' key (the image tower's patch embedding) in the "
                   f"state dict, found {anchors or 'none'}; keys start with {sorted(state_dict)[:5]}. "
                   "Is it a ViT CLIP (not a ResNet CLIP) state dict?")
  prefix = anchors[0][: -len(_ANCHOR)]
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _count_blocks(keys, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
  found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def infer_config(state_dict: Mapping[str, Any], activation: str = "quick_gelu", head_width: int = 64,
                 **overrides: Any) -> clip.CLIPConfig:
  """The architecture of a (prefix-stripped) state dict, read off its shapes.

  The activation is not in the weights: OpenAI's models and those fine-tuned
  from them use 'quick_gelu', open_clip's own pre-training 'gelu'. Without the
  text tower (fine-tuned image encoders) the text fields are those of the
  variant whose image tower matches, else the defaults. Neither is the
  number of attention heads: widths are divided by `head_width` (64 in every
  OpenAI / open_clip ViT).
  """
  sd = state_dict
  conv = np.shape(sd["visual.conv1.weight"])
  width, patch = conv[0], conv[-1]
  positions = np.shape(sd["visual.positional_embedding"])[0]
  grid = math.isqrt(positions - 1)
  if grid * grid != positions - 1:
    raise ValueError(f"visual.positional_embedding has {positions} rows; expected 1 + grid^2.")
  vision = dict(
      embed_dim=np.shape(sd["visual.proj"])[1], image_size=grid * patch, patch_size=patch,
      vision_width=width, vision_layers=_count_blocks(sd, "visual."), vision_heads=width // head_width,
      mlp_ratio=np.shape(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"])[0] / width)
  text_layers = _count_blocks(sd, "")
  if text_layers:
    text_width = np.shape(sd["ln_final.weight"])[0]
    text = dict(context_length=np.shape(sd["positional_embedding"])[0],
                vocab_size=np.shape(sd["token_embedding.weight"])[0], text_width=text_width,
                text_layers=text_layers, text_heads=text_width // head_width)
  else:
    same = [v for v in clip.VARIANTS.values()
            if all(getattr(v, k) == val for k, val in vision.items())]
    base = same[0] if same else clip.CLIPConfig()
    text = {f: getattr(base, f) for f in ("context_length", "vocab_size", "text_width", "text_layers",
                                          "text_heads")}
  for name, width in (("vision", width), ("text", text["text_width"])):
    if width % head_width:
      raise ValueError(f"{name} width {width} is not a multiple of head_width={head_width}; pass the "
                       "head width of this model.")
  values = {**vision, **text, "activation": activation}
  values.update(overrides)
  return clip.CLIPConfig(**{k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in values.items()})


def _to_ours(value: np.ndarray, entry: _Entry) -> np.ndarray:
  if entry.kind == "linear":
    return value.T
  if entry.kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if entry.kind == "qkv":
    width = value.shape[0] // 3
    part = value[entry.part * width:(entry.part + 1) * width]
    return part.T if part.ndim == 2 else part
  return value


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def params_from_state_dict(state_dict: Mapping[str, Any], config: clip.CLIPConfig | None = None, *,
                           towers: Sequence[str] = TOWERS, activation: str = "quick_gelu",
                           head_width: int = 64, strict: bool = True, dtype: Any = np.float32
                           ) -> tuple[dict, clip.CLIPConfig]:
  """Our Param tree (nested dicts of numpy arrays, as `nnx.to_pure_dict`) from an open_clip state dict.

  Args:
    state_dict: key -> array (numpy, or anything `np.asarray` reads); a common
      key prefix is stripped.
    config: the architecture; default `infer_config(state_dict, activation, head_width)`.
    towers: which towers to convert: both, or ('visual',) for image encoders.
    strict: raise on tensors that belong to no converted tower (keys of the
      other tower and `IGNORED_KEYS` are always allowed).

  Returns:
    (params, config). Raises KeyError naming missing / unexpected tensors and
    ValueError naming a tensor whose shape does not fit the config.
  """
  _check_towers(towers)
  sd = strip_prefix(state_dict)
  config = config or infer_config(sd, activation, head_width)
  table = entries(config, towers)
  needed = {e.key for e in table}
  missing = sorted(needed - sd.keys())
  other = {e.key for e in entries(config, TOWERS)} - needed
  unexpected = sorted(k for k in sd.keys() - needed - other - IGNORED_KEYS)
  if missing or (strict and unexpected):
    raise KeyError(f"CLIP state dict does not match towers={tuple(towers)} of {config}: missing "
                   f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                   f"{' ...' if len(unexpected) > 10 else ''}. Convert an image-only encoder with "
                   "towers=('visual',); pass strict=False to ignore extra tensors.")
  abstract = nnx.to_pure_dict(nnx.state(clip.abstract(config), nnx.Param))
  params: dict = {}
  for entry in table:
    value = _to_ours(np.asarray(sd[entry.key], dtype=dtype), entry)
    want = tuple(_get(abstract, entry.path).shape)
    if value.shape != want:
      raise ValueError(f"Tensor {entry.key!r} of shape {np.shape(sd[entry.key])} gives {value.shape} for "
                       f"{'/'.join(map(str, entry.path))}, which expects {want} under {config}.")
    _set(params, entry.path, np.array(value, order="C"))   # (ascontiguousarray makes scalars 1-d)
  return params, config


def state_dict_from_params(params: Mapping, config: clip.CLIPConfig,
                           towers: Sequence[str] = TOWERS) -> dict[str, np.ndarray]:
  """The inverse of `params_from_state_dict`: open_clip's keys and layouts, as numpy arrays."""
  params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  out: dict[str, np.ndarray] = {}
  qkv: dict[str, list] = {}
  for entry in entries(config, towers):
    value = np.asarray(_get(params, entry.path))
    if entry.kind == "linear":
      out[entry.key] = value.T
    elif entry.kind == "conv":
      out[entry.key] = value.transpose(3, 2, 0, 1)
    elif entry.kind == "qkv":
      qkv.setdefault(entry.key, [None] * 3)[entry.part] = value.T if value.ndim == 2 else value
    else:
      out[entry.key] = value
  for key, parts in qkv.items():
    out[key] = np.concatenate(parts, axis=0)
  return out


# --------------------------------------------------------------------------------------
# The tangent-space paper's linearized encoders.


def linearized_names(config: clip.CLIPConfig) -> list[tuple[str, tuple[int, ...]]]:
  """(state-dict key, torch shape) of an `ImageEncoder`'s parameters in `named_parameters()` order.

  The tangent-space paper's `LinearizedModel` stores `params` / `params0` as
  flat lists in this order (functorch's `make_functional_with_buffers` of an
  `ImageEncoder` whose text transformer was deleted): the CLIP module's own
  parameters, then the image tower (its own parameters, then the
  patch convolution, `ln_pre`, the blocks, `ln_post`), then the token
  embedding and `ln_final`. `tests/parity` checks it against open_clip.
  """
  sd = state_dict_from_params(
      jax.tree.map(lambda x: np.zeros(x.shape, np.float32),
                   nnx.to_pure_dict(nnx.state(clip.abstract(config), nnx.Param))), config)
  order = ["positional_embedding", "text_projection", "logit_scale",
           "visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
           "visual.ln_pre.weight", "visual.ln_pre.bias"]
  block = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
           "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
           "mlp.c_proj.weight", "mlp.c_proj.bias")
  order += [f"visual.transformer.resblocks.{i}.{name}" for i in range(config.vision_layers) for name in block]
  order += ["visual.ln_post.weight", "visual.ln_post.bias", "token_embedding.weight",
            "ln_final.weight", "ln_final.bias"]
  return [(k, tuple(sd[k].shape)) for k in order]


def unflatten_linearized(state_dict: Mapping[str, Any], config: clip.CLIPConfig,
                         point: str = "params") -> dict[str, Any]:
  """A named open_clip state dict from a linearized encoder's `...params.<i>` (or `params0`) tensors."""
  if point not in ("params", "params0"):
    raise ValueError(f"point={point!r}; use 'params' (the fine-tuned point) or 'params0' (the expansion point).")
  pattern = re.compile(r"(?:^|.*\.)" + point + r"\.(\d+)$")
  flat = {int(m.group(1)): v for k, v in state_dict.items() if (m := pattern.match(k))}
  names = linearized_names(config)
  if sorted(flat) != list(range(len(names))):
    raise KeyError(f"Linearized checkpoint has {len(flat)} '{point}.<i>' tensors; a {config} image "
                   f"encoder has {len(names)}. Check the architecture (or towers).")
  out = {}
  for i, (name, shape) in enumerate(names):
    if tuple(np.shape(flat[i])) != shape:
      raise ValueError(f"{point}.{i} has shape {np.shape(flat[i])}, but parameter {i} of the image "
                       f"encoder ({name}) has shape {shape}; the parameter order does not match.")
    out[name] = flat[i]
  return out


def is_linearized(state_dict: Mapping[str, Any]) -> bool:
  return any(re.search(r"(^|\.)params0\.\d+$", k) for k in state_dict)


# --------------------------------------------------------------------------------------
# Reading files.


def load_state_dict(source: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """key -> float32 numpy array from `.npz`, `.safetensors` or a torch file.

  Torch files: a state dict, an open_clip training checkpoint
  (`{'state_dict': ...}`), an OpenAI TorchScript archive, or (only with
  `allow_pickle=True`, since unpickling runs code from the file) a pickled
  module such as the task-vector papers' `ImageEncoder`; classes that cannot
  be imported are stood in for by empty `torch.nn.Module`s.
  """
  if not os.path.isfile(source):
    raise FileNotFoundError(f"{source} does not exist; pass a CLIP checkpoint file (.pt, .bin, "
                            ".safetensors or .npz).")
  if source.endswith(".npz"):
    with np.load(source, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if source.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(source)
  return _load_torch(source, allow_pickle)


def _load_torch(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs torch (`pip install torch`, CPU build is enough), or "
                      "convert it to .safetensors / .npz where torch is installed.") from e
  torchscript = zipfile.is_zipfile(path) and any(
      n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist())
  if torchscript:
    obj = torch.jit.load(path, map_location="cpu")
  else:
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      if not allow_pickle:
        raise ValueError(f"{path} is a pickled Python object (e.g. a whole fine-tuned module), not a "
                         "plain state dict. Unpickling runs code from the file: pass allow_pickle=True "
                         "(--allow_pickle) if you trust it.") from e
      obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stub_pickle(torch))
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if hasattr(obj, "state_dict"):
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or module.")
  return {k: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in obj.items() if hasattr(v, "shape")}


def _stub_pickle(torch) -> types.ModuleType:
  """A pickle module whose Unpickler replaces classes it cannot import by empty `nn.Module` subclasses."""

  class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
      try:
        return super().find_class(module, name)
      except (ImportError, AttributeError):
        return type(name, (torch.nn.Module,), {"__module__": module})

  stub = types.ModuleType("stub_pickle")
  stub.Unpickler = Unpickler
  stub.load = pickle.load
  stub.__name__ = "pickle"
  return stub


# --------------------------------------------------------------------------------------
# Orbax checkpoints.


def save(directory: str, params: Mapping, config: clip.CLIPConfig, *, towers: Sequence[str] = TOWERS,
         source: str = "", step: int = 0, extra_metadata: Mapping[str, Any] | None = None) -> None:
  """Writes the Param tree (nested dicts) and its config as an Orbax checkpoint step."""
  from research import checkpoints
  _check_towers(towers)
  params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  missing = [t for t in towers if t not in params]
  if missing:
    raise ValueError(f"save: params lack the towers {missing}; they have {sorted(params)}.")
  keep = {k: v for k, v in params.items() if k in towers or (k == "logit_scale" and "text" in towers)}
  meta = {"format": FORMAT, "config": config.to_dict(), "towers": list(towers), "source": str(source)}
  meta.update(extra_metadata or {})
  with checkpoints.Checkpointer(directory) as ckpt:
    ckpt.save(step, keep, meta)


def convert(source: str | Mapping[str, Any], directory: str, *, activation: str = "quick_gelu",
            head_width: int = 64, towers: Sequence[str] | None = None, linearized_point: str = "params",
            allow_pickle: bool = False, step: int = 0) -> clip.CLIPConfig:
  """Reads a state dict (file or mapping), converts it and writes an Orbax checkpoint; returns the config.

  `towers=None` converts both towers when the text transformer is present,
  else the image tower alone. Linearized encoders are detected and their
  `linearized_point` ('params' = fine-tuned, 'params0' = pre-trained) converted.
  """
  sd = load_state_dict(source, allow_pickle=allow_pickle) if isinstance(source, str) else dict(source)
  extra = {}
  if is_linearized(sd):
    # The flat lists carry no names: the architecture comes from the shapes.
    flat = {k: v for k, v in sd.items() if re.search(r"(^|\.)" + linearized_point + r"\.\d+$", k)}
    shapes = sorted(flat.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[1]))
    config = _config_from_linearized([np.shape(v) for _, v in shapes], activation, head_width)
    sd = unflatten_linearized(sd, config, linearized_point)
    extra = {"linearized_point": linearized_point}
    towers = ("visual",)
  stripped = strip_prefix(sd)
  if towers is None:
    towers = TOWERS if _count_blocks(stripped, "") else ("visual",)
  params, config = params_from_state_dict(stripped, towers=towers, activation=activation,
                                          head_width=head_width, strict=tuple(towers) == TOWERS)
  save(directory, params, config, towers=towers, step=step,
       source=source if isinstance(source, str) else "<state dict>", extra_metadata=extra)
  return config


def _config_from_linearized(shapes: list[tuple[int, ...]], activation: str, head_width: int) -> clip.CLIPConfig:
  # Order: CLIP's own (3), visual's own (class, position, proj), conv1, ...
  width, patch = shapes[6][0], shapes[6][-1]
  grid = math.isqrt(shapes[4][0] - 1)
  n_block = 12   # tensors per residual block
  layers = (len(shapes) - 3 - 3 - 1 - 2 - 2 - 3) // n_block
  base = dict(embed_dim=shapes[5][1], patch_size=patch, image_size=grid * patch, vision_width=width,
              vision_layers=layers, vision_heads=width // head_width, context_length=shapes[0][0],
              text_width=shapes[0][1], text_heads=shapes[0][1] // head_width,
              vocab_size=shapes[-3][0], activation=activation)
  return clip.CLIPConfig(**base)


def checkpoint_config(directory: str, step: int | None = None) -> tuple[clip.CLIPConfig, list[str]]:
  """(config, towers) of a converted checkpoint, read from its leaf shapes (no arrays are read).

  The activation is not in the shapes; `restore` takes it from the metadata.
  """
  from research import checkpoints
  with checkpoints.Checkpointer(directory, read_only=True) as ckpt:
    leaves = ckpt.leaf_paths(step)
  towers = [t for t in TOWERS if f"{t}/proj" in leaves]
  if not towers or ("visual" in towers and "visual/patch_embed/kernel" not in leaves):
    raise ValueError(f"{directory} is not a converted CLIP checkpoint (leaves e.g. {sorted(leaves)[:5]}); "
                     "write one with `python -m experiments.convert_clip`.")
  sd = state_dict_from_params(_nest({p: np.zeros(s.shape, np.float32) for p, s in leaves.items()}),
                              _shape_config(leaves), towers)
  # Head counts do not change shapes: head_width=1 always divides.
  return infer_config(sd, head_width=1), towers


def _shape_config(leaves: Mapping[str, Any]) -> clip.CLIPConfig:
  # Just enough of a config to walk the key table of the stored towers.
  def layers(tower):
    idx = {int(p.split("/")[2]) for p in leaves if p.startswith(f"{tower}/blocks/")}
    return max(idx) + 1 if idx else 1
  return dataclasses.replace(clip.CLIPConfig(), vision_layers=layers("visual"), text_layers=layers("text"))


def _nest(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    keys = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
    _set(out, keys, value)
  return out


def restore(directory: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
            rules: Any = None, dtype: Any = None) -> tuple[dict, clip.CLIPConfig, dict]:
  """(params, config, metadata) of a converted checkpoint; params as nested dicts of jax Arrays.

  With `mesh` and `rules` (logical axis rules, see `research.sharding`) each
  leaf is read straight into its sharding; otherwise onto the first local
  device. `dtype` overrides the computation dtype of the returned config.
  """
  from research import checkpoints, sharding
  shape_config, towers = checkpoint_config(directory, step)
  model = clip.abstract(shape_config)
  state = nnx.state(model, nnx.Param)
  abstract = nnx.to_pure_dict(state)
  if mesh is not None:
    if rules is None:
      raise ValueError("restore: pass the logical axis rules together with the mesh.")
    axes = nnx.to_pure_dict(sharding.logical_axes_from_nnx(state))
    shardings = sharding.logical_sharding(axes, mesh, rules, shapes=abstract)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  target = {k: v for k, v in target.items() if k in towers or (k == "logit_scale" and "text" in towers)}
  params, meta = checkpoints.restore(directory, step, target=target)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{directory} is not a converted CLIP checkpoint (metadata format "
                     f"{meta.get('format')!r}, expected {FORMAT!r}); write it with "
                     "`python -m experiments.convert_clip`.")
  config = clip.CLIPConfig.from_dict(meta["config"])
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  return params, config, meta


def load_model(directory: str, step: int | None = None, **kwargs: Any) -> tuple[clip.CLIP, dict]:
  """A CLIP module (both towers) from a converted checkpoint; see `restore` for the arguments."""
  params, config, meta = restore(directory, step, **kwargs)
  if set(meta["towers"]) != set(TOWERS):
    raise ValueError(f"{directory} holds only the towers {meta['towers']}; load it with "
                     "`load_image_params` (e.g. a fine-tuned image encoder) instead.")
  model = clip.abstract(config)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model, meta


def load_image_params(directory: str, step: int | None = None, **kwargs: Any) -> tuple[nnx.State, clip.CLIPConfig]:
  """The image tower's Params, shaped like `clip.split_image_encoder(model)[1]` (for task vectors)."""
  params, config, _ = restore(directory, step, **kwargs)
  state = nnx.state(clip.abstract(config).visual, nnx.Param)
  nnx.replace_by_pure_dict(state, params["visual"])
  return state, config
