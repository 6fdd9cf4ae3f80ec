"""Tests of research.models.bert / minilm: golden parity with sentence-transformers, the param tree, the functional boundary."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from research.models import bert, minilm, param_tree

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "minilm_golden.npz")
TINY = bert.BertConfig(vocab_size=30522, hidden=32, layers=2, heads=4, intermediate=64, max_position=64)
MINILM_FLOATS_IN_FILE = 22_713_216   # every float tensor in model.safetensors
POOLER_FLOATS = 384 * 384 + 384      # pooler.dense, deliberately not loaded


@pytest.fixture(scope="module")
def pretrained():
  return minilm.load_minilm()


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def golden_batch(pretrained, golden):
  _, tokenizer = pretrained
  return tokenizer.tokenize(list(golden["texts"]), int(golden["max_len"]))


def tiny_inputs(batch=4, length=8, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1000, TINY.vocab_size, (batch, length)).astype(np.int32)
  lengths = rng.randint(2, length + 1, batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return jnp.asarray(ids * mask), jnp.asarray(mask)


# --- golden parity -----------------------------------------------------------------


def test_tokenizer_matches_reference_ids(golden, golden_batch):
  np.testing.assert_array_equal(golden_batch["input_ids"], golden["input_ids"])
  np.testing.assert_array_equal(golden_batch["attention_mask"], golden["attention_mask"])
  assert golden_batch["input_ids"].dtype == np.int32
  # The golden set covers a truncated text and the empty text ([CLS] [SEP]).
  assert golden["attention_mask"].sum(1).max() == golden["max_len"]
  assert golden["attention_mask"].sum(1).min() == 2


def test_encode_matches_sentence_transformers(pretrained, golden, golden_batch):
  model, _ = pretrained
  got = bert.encode(model, jnp.asarray(golden_batch["input_ids"]), jnp.asarray(golden_batch["attention_mask"]))
  assert got.shape == golden["embeddings"].shape == (8, 384)
  np.testing.assert_allclose(got, golden["embeddings"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_apply_fn_matches_reference_mean_pooling(pretrained, golden, golden_batch):
  apply_fn, params = minilm.split_model(pretrained[0])
  got = jax.jit(apply_fn)(params, golden_batch["input_ids"], golden_batch["attention_mask"])
  np.testing.assert_allclose(got, golden["mean_pooled"], atol=1e-5, rtol=0)


def test_padding_does_not_change_the_embedding(pretrained, golden):
  model, tokenizer = pretrained
  texts = list(golden["texts"][:3])
  short, long = tokenizer.tokenize(texts, 16), tokenizer.tokenize(texts, 40)
  a = bert.encode(model, jnp.asarray(short["input_ids"]), jnp.asarray(short["attention_mask"]))
  b = bert.encode(model, jnp.asarray(long["input_ids"]), jnp.asarray(long["attention_mask"]))
  np.testing.assert_allclose(a, b, atol=1e-6)


# --- tokenizer ---------------------------------------------------------------------


def test_tokenize_fixed_shape_truncation_and_errors(pretrained):
  _, tokenizer = pretrained
  out = tokenizer.tokenize(["word " * 100, "a"], max_len=10)
  assert out["input_ids"].shape == out["attention_mask"].shape == (2, 10)
  assert out["input_ids"][0, 0] == 101 and out["input_ids"][0, -1] == 102   # [CLS] ... [SEP]
  np.testing.assert_array_equal(out["input_ids"][1], [101, 1037, 102] + [0] * 7)
  np.testing.assert_array_equal(out["attention_mask"][1], [1, 1, 1] + [0] * 7)
  with pytest.raises(TypeError, match="list of strings"):
    tokenizer.tokenize("one text", max_len=8)
  with pytest.raises(ValueError, match="max_len"):
    tokenizer.tokenize(["x"], max_len=1)


# --- the param tree ----------------------------------------------------------------


def test_param_count_and_shapes(pretrained):
  _, params = minilm.split_model(pretrained[0])
  assert param_tree.param_count(params) == MINILM_FLOATS_IN_FILE - POOLER_FLOATS == 22_565_376
  shapes = {name: shape for name, shape, _ in param_tree.param_summary(params)}
  assert len(shapes) == 5 + 6 * 16
  assert shapes["embeddings/word/embedding"] == (30522, 384)
  assert shapes["embeddings/position/embedding"] == (512, 384)
  assert shapes["embeddings/token_type/embedding"] == (2, 384)
  assert shapes["layers/5/attention/query/kernel"] == (384, 384)
  assert shapes["layers/0/intermediate/kernel"] == (384, 1536)
  assert shapes["layers/0/output/kernel"] == (1536, 384)
  assert shapes["layers/3/output_norm/scale"] == (384,)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_leaf_paths_carry_layer_index(pretrained):
  _, params = minilm.split_model(pretrained[0])
  names = [name for name, _, _ in param_tree.param_summary(params)]
  depths = [int(m.group(1)) for n in names if (m := re.match(r"layers/(\d+)/", n))]
  assert sorted(set(depths)) == list(range(6))
  assert all(depths.count(i) == 16 for i in range(6))
  assert all(n.startswith("embeddings/") for n in names if not n.startswith("layers/"))
  # The raw jax key path holds the integer index too (what LiNeS parses).
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert any(path[:2] == (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey(3)) for path in paths)


def test_logical_axes_name_every_dimension(pretrained):
  model, _ = pretrained
  axes = param_tree.logical_axes(model)
  _, params = minilm.split_model(model)
  is_axes = lambda x: x is None or isinstance(x, tuple)
  pairs = jax.tree.leaves(jax.tree.map(lambda a, p: (a, p.shape), axes, params, is_leaf=is_axes),
                          is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple))
  assert len(pairs) == 101
  for names, shape in pairs:
    assert names is not None and len(names) == len(shape)
    assert set(names) <= set(bert.LOGICAL_AXIS_NAMES)
  assert axes["embeddings"]["word"]["embedding"] == ("vocab", "embed")
  assert axes["layers"][2]["attention"]["query"]["kernel"] == ("embed", "heads")
  assert axes["layers"][2]["attention"]["output"]["kernel"] == ("heads", "embed")
  assert axes["layers"][2]["intermediate"]["kernel"] == ("embed", "mlp")
  assert axes["layers"][2]["intermediate"]["bias"] == ("mlp",)
  assert axes["layers"][2]["output_norm"]["scale"] == ("embed",)
  # The names are flax's own sharding metadata: logical rules turn them into specs.
  with nnx.logical_axis_rules([("mlp", "model"), ("embed", None)]):
    spec = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert spec["layers"][0]["intermediate"]["kernel"].get_value() == PartitionSpec(None, "model")


def test_apply_fn_under_sharded_jit():
  model = minilm.random_init(TINY, seed=1)
  apply_fn, params = minilm.split_model(model)
  ids, mask = tiny_inputs()
  expected = jax.jit(apply_fn)(params, ids, mask)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"heads": "model", "mlp": "model"}   # other names: replicated
  shardings = jax.tree.map(
      lambda names: NamedSharding(mesh, PartitionSpec(*(rules.get(n) for n in names))),
      param_tree.logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
  params = jax.device_put(params, shardings)
  assert params["layers"][0]["intermediate"]["kernel"].get_value().sharding.spec == PartitionSpec(None, "model")
  batch = NamedSharding(mesh, PartitionSpec("data"))
  got = jax.jit(apply_fn, in_shardings=(shardings, batch, batch))(params, ids, mask)
  np.testing.assert_allclose(got, expected, atol=1e-5)


# --- the functional boundary ---------------------------------------------------------


def test_apply_fn_is_pure_jittable_and_differentiable():
  model = minilm.random_init(TINY, seed=2)
  apply_fn, params = minilm.split_model(model)
  ids, mask = tiny_inputs()
  eager = apply_fn(params, ids, mask)
  assert eager.shape == (4, TINY.hidden)
  np.testing.assert_allclose(jax.jit(apply_fn)(params, ids, mask), eager, atol=1e-5)
  np.testing.assert_allclose(bert.mean_pool(model(ids, mask), mask), eager, atol=1e-6)

  f = jax.jit(lambda p: apply_fn(p, ids, mask))
  rng = np.random.RandomState(3)
  tangent = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  primal, jvp_out = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(params, tangent)
  np.testing.assert_allclose(primal, eager, atol=1e-5)
  # Duality <u, J t> == <J^T u, t> ties jvp to vjp; a central difference checks the scale.
  u = rng.normal(size=eager.shape).astype(np.float32)
  (vjp_u,) = jax.jit(lambda p, u: jax.vjp(f, p)[1](u))(params, u)
  lhs = jnp.vdot(u, jvp_out)
  rhs = sum(np.vdot(a, b) for a, b in zip(jax.tree.leaves(vjp_u), jax.tree.leaves(tangent)))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
  eps = 1e-3
  step = lambda s: jax.tree.map(lambda p, t: p + s * eps * t, params, tangent)
  finite = (f(step(1.0)) - f(step(-1.0))) / (2 * eps)
  np.testing.assert_allclose(finite, jvp_out, atol=2e-2 * float(jnp.abs(jvp_out).max()))


def test_apply_fn_does_not_capture_params():
  apply_fn, params = minilm.split_model(minilm.random_init(TINY, seed=0))
  ids, mask = tiny_inputs()
  zeroed = jax.tree.map(jnp.zeros_like, params)   # LayerNorm bias 0 and scale 0 -> all zeros
  np.testing.assert_array_equal(apply_fn(zeroed, ids, mask), 0.0)
  assert float(jnp.abs(apply_fn(params, ids, mask)).max()) > 0


def test_random_init_has_pretrained_structure_but_not_values(pretrained):
  _, params0 = minilm.split_model(pretrained[0])
  _, random = minilm.split_model(minilm.random_init(seed=0))
  assert jax.tree.structure(random) == jax.tree.structure(params0)
  assert jax.tree.map(jnp.shape, random) == jax.tree.map(jnp.shape, params0)
  word = random["embeddings"]["word"]["embedding"].get_value()
  assert not np.allclose(word, params0["embeddings"]["word"]["embedding"].get_value())
  assert abs(float(word.std()) - 0.02) < 1e-3   # BERT's normal(0.02) initialisation
  _, same = minilm.split_model(minilm.random_init(seed=0))
  _, other = minilm.split_model(minilm.random_init(seed=1))
  q = lambda p: p["layers"][0]["attention"]["query"]["kernel"].get_value()
  np.testing.assert_array_equal(q(same), q(random))
  assert not np.allclose(q(other), q(random))


# --- loading errors ------------------------------------------------------------------


def hf_tensors(model):
  """A model's params under Hugging Face names ([out, in] Linear weights)."""
  out = {}
  for name, leaf in ((param_tree.leaf_name(p), l) for p, l in
                     jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]):
    key, transpose = minilm.hf_key(name)
    out[key] = np.ascontiguousarray(np.asarray(leaf).T if transpose else np.asarray(leaf))
  return out


def test_load_params_round_trip_and_ignored_keys(tmp_path):
  source = minilm.random_init(TINY, seed=5)
  tensors = hf_tensors(source)
  assert tensors["encoder.layer.1.intermediate.dense.weight"].shape == (64, 32)   # torch [out, in]
  tensors["embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
  tensors["pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  target = minilm.random_init(TINY, seed=6)
  minilm.load_params(target, str(tmp_path / "model.safetensors"))
  for a, b in zip(jax.tree.leaves(nnx.state(source, nnx.Param)), jax.tree.leaves(nnx.state(target, nnx.Param))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("edit, error, pattern", [
    (lambda t: t.update({"encoder.layer.0.attention.self.key.weight": np.zeros((32, 31), np.float32)}),
     ValueError, r"encoder\.layer\.0\.attention\.self\.key\.weight.*\(32, 31\).*expects \(32, 32\)"),
    (lambda t: t.pop("encoder.layer.1.output.LayerNorm.bias"),
     KeyError, r"missing tensors \['encoder\.layer\.1\.output\.LayerNorm\.bias'\]"),
    (lambda t: t.update({"encoder.layer.2.output.dense.weight": np.zeros((32, 64), np.float32)}),
     KeyError, r"unexpected tensors \['encoder\.layer\.2\.output\.dense\.weight'\]"),
])
def test_load_params_errors_name_the_tensor(tmp_path, edit, error, pattern):
  tensors = hf_tensors(minilm.random_init(TINY, seed=5))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(error, match=pattern):
    minilm.load_params(minilm.random_init(TINY, seed=6), str(tmp_path / "model.safetensors"))


def test_load_minilm_missing_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "model.safetensors"))):
    minilm.load_minilm(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
    minilm.load_minilm(str(tmp_path))


def test_minilm_config_reads_hf_config(tmp_path):
  config = minilm.minilm_config()
  assert config == bert.BertConfig()   # the defaults are MiniLM's
  (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
  with pytest.raises(ValueError, match="hidden_act=relu"):
    minilm.minilm_config(str(tmp_path))
  with pytest.raises(ValueError, match="not divisible"):
    bert.BertConfig(hidden=30, heads=4)


def test_bert_rejects_bad_inputs():
  model = minilm.random_init(TINY, seed=0)
  ids, mask = tiny_inputs()
  with pytest.raises(ValueError, match="same shape"):
    model(ids, mask[:, :-1])
  long = jnp.zeros((1, 65), jnp.int32)
  with pytest.raises(ValueError, match="max_position=64"):
    model(long, jnp.ones_like(long))


def test_bfloat16_compute_keeps_float32_params():
  import dataclasses
  ids, mask = tiny_inputs()
  apply32, params32 = minilm.split_model(minilm.random_init(TINY, seed=0))
  apply16, params16 = minilm.split_model(minilm.random_init(dataclasses.replace(TINY, dtype=jnp.bfloat16), seed=0))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16))
  out32, out16 = jax.jit(apply32)(params32, ids, mask), jax.jit(apply16)(params16, ids, mask)
  assert out16.dtype == jnp.bfloat16
  cosine = jnp.sum(bert.l2_normalize(out32) * bert.l2_normalize(out16.astype(jnp.float32)), -1)
  assert float(cosine.min()) > 0.999
