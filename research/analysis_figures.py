"""Matplotlib figures of the analyses: NTK eigenfunction energy, non-linear advantage, xi with/without pre-training."""
import os

import matplotlib

matplotlib.use("Agg")  # Headless: figures are files, never windows.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def ntk_energy(ntk_results: dict, path: str) -> str:
  """Stacked bars: energy of each top eigenfunction per task; rows: models, columns: raw / cosine."""
  tasks = ntk_results["tasks"]
  models = [m for m in ("pretrained", "random") if m in ntk_results]
  colors = plt.get_cmap("tab10")(np.arange(len(tasks)) % 10)
  fig, axes = plt.subplots(len(models), 2, squeeze=False,
                           figsize=(11, 2.9 * len(models) + 0.6), sharey=True)
  for row, model in enumerate(models):
    for col, kind in enumerate(("raw", "cosine")):
      ax, r = axes[row, col], ntk_results[model][kind]
      energy = np.asarray(r["energy"])  # [k, T]
      x = np.arange(1, len(energy) + 1)
      bottom = np.zeros(len(energy))
      for t, task in enumerate(tasks):
        ax.bar(x, energy[:, t], bottom=bottom, color=colors[t], width=0.85,
               label=task if row == 0 and col == 0 else None)
        bottom += energy[:, t]
      # Where a delocalized eigenfunction would put the task boundaries.
      for share in np.cumsum(ntk_results["input_share"])[:-1]:
        ax.axhline(share, color="k", lw=0.6, ls=":")
      ax.set_title(f"{model}, {kind} kernel: localization {r['localization']:.2f}", fontsize=9)
      ax.set_xticks(x)
      ax.set_xlabel("eigenfunction (by eigenvalue)")
      ax.set_ylim(0, 1)
      if col == 0:
        ax.set_ylabel("energy share per task")
  fig.legend(loc="lower center", ncol=min(len(tasks), 6), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def nonlinear_advantage(kernel_regime: dict, path: str) -> str:
  """Grouped bars per task: zero-shot, standard, posthoc (same tau, linearized), linear FT."""
  tasks = list(kernel_regime)
  series = [("zero-shot", "zeroshot"), ("standard FT", "standard"),
            ("post-hoc linearized", "posthoc"), ("linear FT", "linear")]
  x = np.arange(len(tasks))
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(1.5 * len(tasks) + 2, 4.6), layout="constrained")
  for i, (label, key) in enumerate(series):
    values = [kernel_regime[t][key] for t in tasks]
    ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
  for xi, t in zip(x, tasks):
    ax.annotate(f"{100 * kernel_regime[t]['nonlinear_advantage']:+.1f}",
                (xi, 1.0), ha="center", va="bottom", fontsize=7)
  ax.set_xticks(x, tasks, rotation=20)
  ax.set_ylabel("single-task test accuracy")
  ax.set_ylim(0, 1.08)
  ax.set_title("Kernel-regime test (numbers: non-linear advantage = standard - posthoc, %)",
               fontsize=9)
  ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def disentanglement_pretraining(pretrained: dict, random_init: dict, path: str) -> str:
  """xi heatmaps: one row per pair; columns pre-trained / random init x mode, one color scale."""
  columns = [(name, mode, d[mode]) for name, d in (("pre-trained", pretrained),
                                                   ("random init", random_init))
             for mode in d]
  pairs = list(columns[0][2]["pairs"])
  vmax = max(max(np.max(c[2]["pairs"][p]["xi"]) for c in columns for p in pairs), 1e-6)
  fig, axes = plt.subplots(len(pairs), len(columns), squeeze=False, layout="constrained",
                           figsize=(3.4 * len(columns) + 1, 3.2 * len(pairs)))
  for col, (name, mode, d) in enumerate(columns):
    alphas = np.asarray(d["alphas"])
    for row, pair in enumerate(pairs):
      ax, xi = axes[row, col], np.asarray(d["pairs"][pair]["xi"])
      im = ax.imshow(xi.T, origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                     extent=(alphas[0], alphas[-1], alphas[0], alphas[-1]))
      a, b = pair.split("+")
      ax.set_xlabel(f"alpha ({a})", fontsize=8)
      ax.set_ylabel(f"alpha ({b})", fontsize=8)
      ax.set_title(f"{name}, {mode}: mean xi {xi.mean():.3f}", fontsize=9)
  fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="xi")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_all(results: dict, workdir: str) -> dict:
  """All three figures into `workdir`; returns {name: path}."""
  return {
      "ntk_energy": ntk_energy(results["ntk"], os.path.join(workdir, "ntk_energy.png")),
      "nonlinear_advantage": nonlinear_advantage(
          {t: r for t, r in results["kernel_regime"].items()},
          os.path.join(workdir, "nonlinear_advantage.png")),
      "disentanglement_pretraining": disentanglement_pretraining(
          results["pretrained"]["disentanglement"], results["random_init"]["disentanglement"],
          os.path.join(workdir, "disentanglement_pretraining.png")),
  }
