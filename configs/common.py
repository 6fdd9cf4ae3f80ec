"""Shared config helpers: a small typed parser for the `get_config(arg)` argument.

`parse_arg("quick,seed=3", preset="quick", seed=0, runlocal=False)` returns a
ConfigDict with `preset="quick", seed=3, runlocal=False`. A bare token sets the
first (positional) key unless it names a bool key, which it sets to True.
Unknown keys raise, so a typo on the command line fails loudly.
"""
import ml_collections


def _convert(key, text, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", ""):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"Config arg {key!r} expects a bool, got {text!r}.")
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(
        f"Config arg {key!r} expects {type(default).__name__}, got {text!r}.") from e


def parse_arg(arg, **spec):
  """Parses 'a=1,b=x,flag' against `spec` (name -> default, typed by default)."""
  if not spec:
    raise ValueError("parse_arg needs at least one key with a default.")
  values = dict(spec)
  first_key = next(iter(spec))
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, sep, text = token.partition("=")
    if not sep:
      if isinstance(spec.get(key), bool):
        text = "true"
      else:
        key, text = first_key, token
    if key not in spec:
      raise ValueError(
          f"Unknown config arg {key!r} in {arg!r}; known args: {sorted(spec)}.")
    values[key] = _convert(key, text, spec[key])
  return ml_collections.ConfigDict(values)
