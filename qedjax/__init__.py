"""qedjax: post-training small Qwen3 models to write olympiad proofs, in JAX (the QED-Nano recipe)."""

__version__ = "0.1.0"
