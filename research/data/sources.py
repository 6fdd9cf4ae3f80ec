"""Where the raw data lives: default roots, the Debian package of each file, a parse cache."""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

T = TypeVar("T")

# Source name -> default root directory (the Debian install location).
DEFAULT_ROOTS = {
    "wordnet": "/usr/share/wordnet",
    "fortunes": "/usr/share/games/fortunes",
    "dict": "/usr/share/dict",
}


class MissingDataError(FileNotFoundError):
  """A data file is absent; the message names the path and the package that ships it."""


def require(path: str | os.PathLike, package: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingDataError(
        f"data file {path} not found: it ships in the Debian package {package!r}; "
        f"install it with `sudo apt-get install {package}` (or `make data`), "
        f"or pass root= pointing at a folder that holds it")
  return path


def read_text(path: str | os.PathLike, package: str, encoding: str = "utf-8") -> str:
  with open(require(path, package), encoding=encoding, errors="replace") as f:
    return f.read()


def root_for(source: str, root: str | os.PathLike | None) -> str:
  if source not in DEFAULT_ROOTS:
    raise ValueError(f"unknown data source {source!r}; expected one of {sorted(DEFAULT_ROOTS)}")
  return os.fspath(root) if root is not None else DEFAULT_ROOTS[source]


def _fingerprint(path: str) -> tuple[str, int, int] | None:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return path, st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _cached(key: tuple, parse: Callable[..., T], args: tuple) -> T:
  return parse(key[0], *args)


def cached(path: str | os.PathLike, parse: Callable[..., T], *args,
           depends_on: tuple[str | os.PathLike, ...] = ()) -> T:
  """`parse(path, *args)`, memoised on `args` and on the path, mtime and size of
  `path` and of every file in `depends_on`, so a changed file is parsed again.

  Parsing is pure; results are tuples or treated as read-only by callers.
  """
  paths = [os.path.abspath(os.fspath(p)) for p in (path, *depends_on)]
  prints = tuple(_fingerprint(p) for p in paths)
  if None in prints:
    return parse(paths[0], *args)  # the parser raises the helpful MissingDataError
  return _cached((paths[0],) + prints, parse, args)
