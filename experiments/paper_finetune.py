"""Entry point: fine-tunes CLIP's image encoder on one task in one mode; see configs/paper/finetune.py."""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from research import distributed
from research import paper

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/paper/finetune.py", "Fine-tuning config (task, mode, model).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Overrides config.workdir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  distributed.initialize()  # No-op on one host; the same command runs on every worker.
  config = _CONFIG.value
  results = paper.finetune(config, _WORKDIR.value or config.workdir)
  if distributed.is_main_process():
    print(paper.format_finetune(results))


if __name__ == "__main__":
  app.run(main)
