"""Real text classification tasks from Debian-packaged data (WordNet, fortunes, word lists).

    from research import data
    task = data.load_task("topic", (512, 128, 256), seed=0)
    texts, labels = task.train                  # list[str], int32 array [512]
    for idx in data.batches(len(texts), 32, seed=0, epochs=3):
      batch_texts, batch_labels = data.gather(task.train, idx)
    for idx, mask in data.eval_batches(len(task.test.texts), 64):
      ...                                       # weight metrics by mask

Nothing is read at import time; see research/data/TASKS.md for the tasks.
"""
from research.data.batching import batches, eval_batches, gather, num_batches
from research.data.sources import DEFAULT_ROOTS, MissingDataError
from research.data.tasks import (CONTROL_TASK, DEFAULT_SPLIT_SIZES, TASKS, Split, Task,
                                 TaskSpec, class_counts, load_task, pool, spec, task_names)

__all__ = [
    "CONTROL_TASK", "DEFAULT_ROOTS", "DEFAULT_SPLIT_SIZES", "MissingDataError", "Split",
    "TASKS", "Task", "TaskSpec", "batches", "class_counts", "eval_batches", "gather",
    "load_task", "num_batches", "pool", "spec", "task_names",
]
