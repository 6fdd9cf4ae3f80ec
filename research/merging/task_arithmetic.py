"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

  tau = lambda * sum_t tau_t

The paper picks lambda on held-out validation data (from {0, 0.05, ..., 1};
values near 0.3-0.4 for 8 ViT tasks). Here the default is lambda = 1, the
plain sum: the evaluation protocol of this codebase searches the scaling
``alpha`` of ``task_vectors.apply(params0, tau, alpha)`` on validation,
which plays the role of lambda. No statistics; no buffer beyond the output.
"""
from __future__ import annotations


from research.merging import hparams
from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


@register("task_arithmetic")
def task_arithmetic(scale: float = 1.0) -> Merge:
  """``scale`` times the sum of the stacked task vectors."""
  scale = hparams.real(scale, "scale")
  return stacked_lib.leafwise(lambda x: scale * stacked_lib.task_sum(x))
