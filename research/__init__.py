"""Task arithmetic, tangent-space (NTK-linearized) fine-tuning and model merging in JAX.

Public primitives: `research.task_vectors`, `research.tangent`, `research.merging`.
"""
