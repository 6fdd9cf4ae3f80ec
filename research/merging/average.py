"""Weight averaging of task vectors (model soups, Wortsman et al. 2022).

  tau = (1 / T) sum_t tau_t

Equivalent to averaging the fine-tuned models themselves. No statistics;
no buffer beyond the output.
"""
from __future__ import annotations


from research.merging import stacked as stacked_lib
from research.merging.base import Merge
from research.merging.registry import register


@register("average")
def average() -> Merge:
  """Mean of the stacked task vectors over the task axis."""
  return stacked_lib.leafwise(stacked_lib.task_mean)
