"""Matplotlib figures of the reproduction: disentanglement heatmaps, accuracy bars."""
import matplotlib

matplotlib.use("Agg")  # Headless: figures are files, never windows.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def disentanglement_heatmaps(disentanglement: dict, path: str) -> str:
  """One row per task pair, one column per mode: xi(alpha_1, alpha_2)."""
  modes = list(disentanglement)
  pairs = list(disentanglement[modes[0]]["pairs"])
  fig, axes = plt.subplots(len(pairs), len(modes), squeeze=False,
                           figsize=(4.2 * len(modes), 3.6 * len(pairs)))
  vmax = max(np.max(disentanglement[m]["pairs"][p]["xi"]) for m in modes for p in pairs)
  for col, mode in enumerate(modes):
    alphas = np.asarray(disentanglement[mode]["alphas"])
    for row, pair in enumerate(pairs):
      ax = axes[row, col]
      xi = np.asarray(disentanglement[mode]["pairs"][pair]["xi"])
      im = ax.imshow(xi.T, origin="lower", cmap="viridis", vmin=0, vmax=max(vmax, 1e-6),
                     extent=(alphas[0], alphas[-1], alphas[0], alphas[-1]))
      a, b = pair.split("+")
      ax.set_xlabel(f"alpha ({a})")
      ax.set_ylabel(f"alpha ({b})")
      ax.set_title(f"{mode}: xi, mean {xi.mean():.3f}")
      fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def accuracy_bars(results: dict, path: str) -> str:
  """Per task: single-task fine-tuned vs task-addition accuracy, for each mode."""
  tasks = list(results["tasks"])
  modes = list(results["task_addition"])
  series = [("zero-shot", [results["zeroshot"][t] for t in tasks])]
  for mode in modes:
    series.append((f"{mode} single-task", [results["single_task"][mode][t] for t in tasks]))
    series.append((f"{mode} task addition",
                   [results["task_addition"][mode]["absolute"][t] for t in tasks]))
  x = np.arange(len(tasks))
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(1.8 * len(tasks) + 2, 4.5))
  for i, (label, values) in enumerate(series):
    ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
  ax.set_xticks(x, tasks, rotation=20)
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
