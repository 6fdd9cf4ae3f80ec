"""Entry point: task addition and negation of one model in one mode; see configs/paper/evaluate.py."""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import distributed
from research import paper

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/paper/evaluate.py", "Evaluation config (model, mode).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.workdir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  distributed.initialize()  # Every worker evaluates on its own devices; process 0 writes.
  config = _CONFIG.value
  results = paper.evaluate(config, _WORKDIR.value or config.workdir)
  if distributed.is_main_process():
    print(paper.format_evaluate(results))


if __name__ == "__main__":
  app.run(main)
