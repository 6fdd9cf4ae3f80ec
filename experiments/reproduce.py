"""Entry point of the main job; see configs/reproduce.py for the command."""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import distributed
from research import reproduce

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/reproduce.py", "Experiment config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.workdir.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  distributed.initialize()  # No-op on one host; the same command runs on every worker.
  config = _CONFIG.value
  results = reproduce.run(config, _WORKDIR.value or config.workdir)
  if not distributed.is_main_process():
    return
  print(reproduce.format_tables(results))
  print(f"\nwall time {results['wall_time_s']:.0f} s; wrote {results['results_path']}")
  for name, path in results["figures"].items():
    print(f"figure {name}: {path}")


if __name__ == "__main__":
  app.run(main)
