"""Validation of merge hyper-parameters, with errors that name the hyper-parameter and its range."""
from __future__ import annotations

import math


def real(value, name: str) -> float:
  """``value`` as a finite float, else ``ValueError`` naming ``name``."""
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real number, got {value!r}.") from None
  if not math.isfinite(out):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  return out


def fraction(value, name: str, *, low_open: bool = True, high_open: bool = False) -> float:
  """``value`` in (0, 1] by default (``low_open`` / ``high_open`` pick the interval's ends)."""
  lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
  interval = f"{lo}0, 1{hi}"
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}.") from None
  ok = (out > 0 if low_open else out >= 0) and (out < 1 if high_open else out <= 1)
  if not ok:   # also catches NaN
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")
  return out


def boolean(value, name: str) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return value
