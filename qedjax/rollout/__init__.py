"""Rollout engines: the interface (engine.py), the JAX sampler, the vLLM engine, RC, the weight store."""

from qedjax.rollout.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    Message,
    Request,
    RolloutEngine,
    SamplingParams,
)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Completion",
    "Message",
    "Request",
    "RolloutEngine",
    "SamplingParams",
]
