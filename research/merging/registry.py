"""Name -> factory registry for merge methods: ``register`` (a decorator) and ``get``.

Factories register themselves when their module is imported::

  @register("ties")
  def ties(density=0.2, scale=1.0, per_leaf=False) -> Merge: ...

``get(name, **hparams)`` checks the name and the hyper-parameter names
against the factory's signature before calling it, so a typo in a config
fails with a message that lists what is valid. Value checks (a density
outside (0, 1], ...) are the factory's own and raise ``ValueError``.
"""
from __future__ import annotations

import inspect
from typing import Callable

from research.merging.base import Merge

_REGISTRY: dict[str, Callable[..., Merge]] = {}


def register(name: str) -> Callable[[Callable[..., Merge]], Callable[..., Merge]]:
  """Decorator: make ``factory`` available as ``get(name, **hparams)``."""
  def deco(factory):
    if name in _REGISTRY and _REGISTRY[name] is not factory:
      raise ValueError(f"merge method {name!r} is registered twice.")
    _REGISTRY[name] = factory
    return factory
  return deco


def names() -> tuple[str, ...]:
  """Registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def defaults(name: str) -> dict[str, object]:
  """The hyper-parameters of method ``name`` and their defaults."""
  sig = inspect.signature(_factory(name))
  return {k: p.default for k, p in sig.parameters.items()}


def _factory(name):
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(
        f"Unknown merge method {name!r}. Known methods: {', '.join(names())}. "
        "Fix: use one of these names (see research.merging.METHODS).")
  return _REGISTRY[name]


def get(name: str, **hparams: object) -> Merge:
  """The `Merge` of method ``name`` built with ``hparams`` (defaults: the paper's)."""
  factory = _factory(name)
  sig = inspect.signature(factory)
  unknown = [k for k in hparams if k not in sig.parameters]
  if unknown:
    valid = ", ".join(f"{k}={p.default!r}" for k, p in sig.parameters.items()) or "none"
    raise ValueError(
        f"Unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for merge "
        f"method {name!r}. Valid hyper-parameters (with defaults): {valid}.")
  return factory(**hparams)
