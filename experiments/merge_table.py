"""Entry point of the merging results table; see configs/merge_table.py for the command."""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import merge_table

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/merge_table.py", "Merge-table config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.workdir.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = _CONFIG.value
  out = merge_table.run(config, _WORKDIR.value or config.workdir)
  print(out["table"])
  print(f"\nwall time {out['wall_time_s']:.0f} s; wrote {out['results_path']}")
  print(f"figure: {out['figure']}")


if __name__ == "__main__":
  app.run(main)
