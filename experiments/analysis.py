"""Entry point of the analyses (NTK localization, kernel-regime test, pre-training); see configs/analysis.py."""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import analysis

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/analysis.py", "Analysis config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.workdir.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = _CONFIG.value
  results = analysis.run(config, _WORKDIR.value or config.workdir)
  print(analysis.format_report(results))
  print(f"\nwall time {results['wall_time_s']:.0f} s; wrote {results['results_path']}")
  for name, path in results["figures"].items():
    print(f"figure {name}: {path}")


if __name__ == "__main__":
  app.run(main)
