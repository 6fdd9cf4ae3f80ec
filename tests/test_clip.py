"""Tests of research.models.clip and clip_convert: a numpy reference forward on open_clip's layout, conversion round trips, Orbax restore."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import sharding, tangent
from research.models import clip, clip_convert, param_tree

TINY = clip.tiny_config()
HW = TINY.vision_width // TINY.vision_heads   # the tiny model's head width (64 in real CLIPs)


# --- an open_clip-layout state dict and a numpy forward pass written from its keys ------------------


def fake_state_dict(config, seed=0, text=True):
  """Random tensors under open_clip's key names and torch layouts, written out by hand."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  sd = {}

  def blocks(prefix, width, layers):
    hidden = int(width * config.mlp_ratio)
    for i in range(layers):
      b = f"{prefix}transformer.resblocks.{i}."
      sd.update({b + "ln_1.weight": 1 + r(width), b + "ln_1.bias": r(width),
                 b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
                 b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
                 b + "ln_2.weight": 1 + r(width), b + "ln_2.bias": r(width),
                 b + "mlp.c_fc.weight": r(hidden, width), b + "mlp.c_fc.bias": r(hidden),
                 b + "mlp.c_proj.weight": r(width, hidden), b + "mlp.c_proj.bias": r(width)})

  w, p = config.vision_width, config.patch_size
  sd.update({"visual.conv1.weight": r(w, 3, p, p), "visual.class_embedding": r(w),
             "visual.positional_embedding": r(config.grid ** 2 + 1, w),
             "visual.ln_pre.weight": 1 + r(w), "visual.ln_pre.bias": r(w),
             "visual.ln_post.weight": 1 + r(w), "visual.ln_post.bias": r(w),
             "visual.proj": r(w, config.embed_dim)})
  blocks("visual.", w, config.vision_layers)
  tw = config.text_width
  sd.update({"token_embedding.weight": r(config.vocab_size, tw),
             "positional_embedding": r(config.context_length, tw),
             "ln_final.weight": 1 + r(tw), "ln_final.bias": r(tw),
             "text_projection": r(tw, config.embed_dim), "logit_scale": np.float32(np.log(100.0))})
  if text:
    blocks("", tw, config.text_layers)
  return sd


def _ln(x, w, b):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _blocks(sd, prefix, x, layers, heads, mask=None):
  for i in range(layers):
    b = f"{prefix}transformer.resblocks.{i}."
    h = _ln(x, sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
    qkv = h @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]
    n, length, width = h.shape
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
    if mask is not None:
      s = np.where(mask, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(n, length, width)
    x = x + o @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
    h = _ln(x, sd[b + "ln_2.weight"], sd[b + "ln_2.bias"]) @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"]
    h = h / (1 + np.exp(-1.702 * h))   # QuickGELU
    x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
  return x


def reference_image(sd, config, images_nchw):
  """open_clip's VisionTransformer.forward, in float64 numpy."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  p, n = config.patch_size, images_nchw.shape[0]
  g = config.grid
  patches = images_nchw.reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
  x = patches @ sd["visual.conv1.weight"].reshape(config.vision_width, -1).T
  cls = np.broadcast_to(sd["visual.class_embedding"], (n, 1, config.vision_width))
  x = np.concatenate([cls, x], 1) + sd["visual.positional_embedding"]
  x = _ln(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
  x = _blocks(sd, "visual.", x, config.vision_layers, config.vision_heads)
  return _ln(x[:, 0], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def reference_text(sd, config, ids):
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  length = ids.shape[1]
  x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]
  mask = np.tril(np.ones((length, length), bool))
  x = _blocks(sd, "", x, config.text_layers, config.text_heads, mask)
  x = _ln(x, sd["ln_final.weight"], sd["ln_final.bias"])
  return x[np.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def inputs(config, n=3, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, 3, config.image_size, config.image_size)).astype(np.float32)
  ids = rng.integers(1, config.vocab_size - 1, (n, config.context_length))
  lengths = [2, 5, config.context_length]
  for row, length in enumerate(lengths[:n]):
    ids[row, length - 1] = config.vocab_size - 1   # end-of-text: the highest id
    ids[row, length:] = 0
  return images, ids.astype(np.int32)


@pytest.fixture(scope="module")
def converted():
  sd = fake_state_dict(TINY)
  params, config = clip_convert.params_from_state_dict(sd, head_width=HW)
  model = clip.abstract(config)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return sd, config, model


# --- the model ------------------------------------------------------------------------------


def test_converted_model_matches_numpy_reference(converted):
  sd, config, model = converted
  assert config == TINY
  images, ids = inputs(config)
  got_img = model.encode_image(jnp.asarray(images.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got_img, reference_image(sd, config, images), atol=2e-4, rtol=1e-4)
  got_txt = model.encode_text(jnp.asarray(ids))
  np.testing.assert_allclose(got_txt, reference_text(sd, config, ids), atol=2e-4, rtol=1e-4)


def test_text_padding_after_eot_is_ignored(converted):
  _, config, model = converted
  _, ids = inputs(config, n=2)
  other = ids.copy()
  other[0, 2:] = 7   # after the end-of-text token: causally masked away
  np.testing.assert_allclose(model.encode_text(jnp.asarray(ids)), model.encode_text(jnp.asarray(other)),
                             atol=1e-6)


def test_variants_have_the_papers_sizes():
  b32 = clip.abstract(clip.get_config("B/32"))
  assert param_tree.param_count(b32) == 151_277_313   # open_clip ViT-B-32
  assert param_tree.param_count(b32.visual) == 87_849_216
  b16 = clip.get_config("ViT-B-16-quickgelu")
  assert (b16.patch_size, b16.grid, b16.activation) == (16, 14, "quick_gelu")
  l14 = clip.get_config("L/14")
  assert (l14.vision_width, l14.vision_layers, l14.vision_heads, l14.embed_dim, l14.text_width) == (
      1024, 24, 16, 768, 768)
  assert clip.get_config("ViT-B-32").activation == "gelu"
  with pytest.raises(ValueError, match="Unknown CLIP variant"):
    clip.get_config("ViT-H-14")


def test_every_param_has_logical_axes_known_to_the_module():
  model = clip.abstract(TINY)
  axes = jax.tree.leaves(param_tree.logical_axes(model), is_leaf=lambda x: isinstance(x, tuple))
  shapes = [s for _, s, _ in param_tree.param_summary(model)]
  assert len(axes) == len(shapes)
  assert all(len(a) == len(s) for a, s in zip(axes, shapes))
  assert {n for a in axes for n in a if n} == set(clip.LOGICAL_AXIS_NAMES)


def test_leaf_names_follow_the_documented_layout():
  names = [n for n, _, _ in param_tree.param_summary(clip.abstract(TINY))]
  assert "visual/blocks/1/attn/query/kernel" in names
  assert "text/token_embedding/embedding" in names and "logit_scale" in names
  assert all(re.fullmatch(r"(visual|text)/.+|logit_scale", n) for n in names)


def test_image_apply_fn_normalises_uint8_and_jits_differentiates_linearizes(converted):
  _, config, model = converted
  apply_fn, params = clip.split_image_encoder(model)
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (2, config.image_size, config.image_size, 3), dtype=np.uint8)
  norm = (raw / 255.0 - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
  a = jax.jit(apply_fn)(params, jnp.asarray(raw))
  np.testing.assert_allclose(a, apply_fn(params, jnp.asarray(norm, jnp.float32)), atol=1e-5)
  grads = jax.grad(lambda p: apply_fn(p, jnp.asarray(raw)).sum())(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  f_lin = tangent.linearize(apply_fn)
  np.testing.assert_allclose(f_lin(params, params, jnp.asarray(raw)), a, atol=1e-5)


def test_remat_and_bfloat16_give_the_same_embeddings(converted):
  sd, config, model = converted
  images, _ = inputs(config, n=2)
  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  for variant in (dataclasses.replace(config, remat=True), dataclasses.replace(config, dtype=jnp.bfloat16)):
    params, _ = clip_convert.params_from_state_dict(sd, variant)
    other = clip.abstract(variant)
    state = nnx.state(other, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(other, state)
    tol = 1e-5 if variant.dtype == jnp.float32 else 0.1
    np.testing.assert_allclose(np.asarray(other.encode_image(x), np.float32), model.encode_image(x),
                               atol=tol, rtol=tol)


def test_wrong_image_shape_is_a_clear_error(converted):
  with pytest.raises(ValueError, match="expects images"):
    converted[2].encode_image(jnp.zeros((1, 3, 32, 32)))


# --- conversion -----------------------------------------------------------------------------


def test_state_dict_round_trip_is_exact():
  sd = fake_state_dict(TINY)
  params, config = clip_convert.params_from_state_dict(sd, head_width=HW)
  back = clip_convert.state_dict_from_params(params, config)
  assert set(back) == set(sd) - {"logit_scale"} | {"logit_scale"}
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_prefixes_and_openai_extras_are_handled():
  sd = fake_state_dict(TINY)
  prefixed = {"module." + k: v for k, v in sd.items()}
  prefixed.update({"module.input_resolution": np.int64(32), "module.context_length": np.int64(12)})
  params, _ = clip_convert.params_from_state_dict(prefixed, head_width=HW)
  ref, _ = clip_convert.params_from_state_dict(sd, head_width=HW)
  jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_image_encoder_only_conversion():
  sd = {"model." + k: v for k, v in fake_state_dict(TINY, text=False).items()}
  config = clip_convert.infer_config(clip_convert.strip_prefix(sd), head_width=HW)
  assert config.vision_layers == TINY.vision_layers and config.text_layers == clip.CLIPConfig().text_layers
  params, _ = clip_convert.params_from_state_dict(sd, TINY, towers=("visual",))
  assert set(params) == {"visual"}
  with pytest.raises(KeyError, match="towers=\\('visual',\\)"):
    clip_convert.params_from_state_dict(sd, TINY)


def test_conversion_errors_name_the_tensor():
  sd = fake_state_dict(TINY)
  del sd["visual.ln_post.bias"]
  with pytest.raises(KeyError, match="visual.ln_post.bias"):
    clip_convert.params_from_state_dict(sd, head_width=HW)
  sd = fake_state_dict(TINY)
  sd["visual.proj"] = sd["visual.proj"][:, :3]
  with pytest.raises(ValueError, match="visual.proj"):
    clip_convert.params_from_state_dict(sd, TINY)
  sd = fake_state_dict(TINY)
  sd["extra.head"] = np.zeros(3)
  with pytest.raises(KeyError, match="visual.conv1.weight|extra.head"):
    clip_convert.params_from_state_dict({"visual.extra": np.zeros(2), **sd}, head_width=HW)
  with pytest.raises(KeyError, match="visual.conv1.weight"):
    clip_convert.params_from_state_dict({"conv.weight": np.zeros(3)})


def test_linearized_encoder_flat_lists_are_named_in_parameter_order():
  sd = fake_state_dict(TINY, text=False)
  names = clip_convert.linearized_names(TINY)
  assert len(names) == 14 + 12 * TINY.vision_layers
  flat = {f"model.params.{i}": sd[name] for i, (name, _) in enumerate(names)}
  flat.update({f"model.params0.{i}": np.zeros_like(sd[name]) for i, (name, _) in enumerate(names)})
  assert clip_convert.is_linearized(flat)
  named = clip_convert.unflatten_linearized(flat, TINY)
  for name, _ in names:
    np.testing.assert_array_equal(named[name], sd[name])
  flat["model.params.3"] = np.zeros(5)
  with pytest.raises(ValueError, match="params.3"):
    clip_convert.unflatten_linearized(flat, TINY)


# --- Orbax checkpoints ----------------------------------------------------------------------


def test_convert_file_then_load_model_and_image_params(tmp_path, converted):
  sd, config, model = converted
  source = tmp_path / "clip.npz"
  np.savez(source, **sd)
  got_config = clip_convert.convert(str(source), str(tmp_path / "ckpt"), head_width=HW)
  assert got_config == config
  loaded, meta = clip_convert.load_model(str(tmp_path / "ckpt"))
  assert meta["towers"] == ["visual", "text"] and meta["config"]["activation"] == "quick_gelu"
  images, ids = inputs(config, n=2)
  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(loaded.encode_image(x), model.encode_image(x))
  np.testing.assert_array_equal(loaded.encode_text(jnp.asarray(ids)), model.encode_text(jnp.asarray(ids)))
  assert clip.temperature(loaded) == pytest.approx(100.0, rel=1e-5)

  # An image-only (fine-tuned encoder) checkpoint gives Params shaped like split_image_encoder's.
  image_only = {"model." + k: v for k, v in sd.items() if k.startswith("visual.")}
  clip_convert.convert(image_only, str(tmp_path / "ft"), head_width=HW)
  ft_params, ft_config = clip_convert.load_image_params(str(tmp_path / "ft"))
  apply_fn, params0 = clip.split_image_encoder(model)
  assert jax.tree.structure(ft_params) == jax.tree.structure(params0)
  np.testing.assert_array_equal(apply_fn(ft_params, x), model.encode_image(x))
  with pytest.raises(ValueError, match="load_image_params"):
    clip_convert.load_model(str(tmp_path / "ft"))


def test_restore_into_logical_shardings(tmp_path):
  sd = fake_state_dict(TINY)
  clip_convert.convert(sd, str(tmp_path / "ckpt"), head_width=HW)
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", None), ("mlp", "fsdp"),
           ("vocab", None), ("position", None), ("joint", None)]
  params, config, _ = clip_convert.restore(str(tmp_path / "ckpt"), mesh=mesh, rules=rules)
  kernel = params["visual"]["blocks"][0]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert params["visual"]["proj"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  ref, _ = clip_convert.params_from_state_dict(sd, head_width=HW)
  np.testing.assert_array_equal(kernel, ref["visual"]["blocks"][0]["mlp_in"]["kernel"])


def test_restore_rejects_other_checkpoints(tmp_path):
  from research import checkpoints
  with checkpoints.Checkpointer(tmp_path / "x") as ckpt:
    ckpt.save(0, {"visual": {"proj": np.zeros((2, 2), np.float32)}}, {"format": "other"})
  with pytest.raises(ValueError, match="not a converted CLIP checkpoint"):
    clip_convert.restore(str(tmp_path / "x"))


def test_image_tower_under_a_sharded_jit_matches_one_device(converted):
  _, config, model = converted
  apply_fn, params = clip.split_image_encoder(model)
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", None), ("mlp", "fsdp"),
           ("vocab", None), ("position", None), ("joint", None)]
  shardings = sharding.logical_sharding(sharding.logical_axes_from_nnx(params), mesh, rules, shapes=params)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  images = np.random.default_rng(0).integers(0, 256, (8, config.image_size, config.image_size, 3), np.uint8)
  f = jax.jit(apply_fn, in_shardings=(shardings, batch_sharding))
  got = f(jax.device_put(params, shardings), jax.device_put(images, batch_sharding))
  np.testing.assert_allclose(got, apply_fn(params, jnp.asarray(images)), atol=1e-5)


def test_convert_clip_entry_point(tmp_path, capsys):
  from absl import flags
  from experiments import convert_clip
  source = tmp_path / "clip.npz"
  np.savez(source, **fake_state_dict(TINY))
  argv = ["convert_clip", f"--source={source}", f"--out={tmp_path / 'ckpt'}", f"--head_width={HW}"]
  flags.FLAGS(argv)
  try:
    convert_clip.main([])
  finally:
    flags.FLAGS.unparse_flags()
  assert "towers=['visual', 'text']" in capsys.readouterr().out
  model, _ = clip_convert.load_model(str(tmp_path / "ckpt"))
  assert model.config == TINY
