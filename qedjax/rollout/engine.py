"""The rollout-engine interface: what the RL loop and the evaluation code ask of a generator.

Two implementations sit behind it: `qedjax.rollout.jax_engine.JaxEngine` (the in-process JAX sampler;
CPU, TPU, tests and the demo) and `qedjax.rollout.vllm.VllmEngine` (vLLM on GPUs, fed from the weight
store). Text goes through the tokenizer and chat template here, never in the sampler.

A request is either a plain prompt string (sent as is) or a chat: a list of `{"role", "content"}`
messages, rendered with the tokenizer's chat template and a generation prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, Union, runtime_checkable

Message = dict[str, str]
Request = Union[str, Sequence[Message]]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated answer.

    `logprobs[i]` is the log-probability of `tokens[i]` under the distribution it was sampled from
    (after temperature): the behaviour logprobs of GRPO's importance ratio. When the chat template
    opened a think block in the prompt, `text` starts with that `<think>` tag (see qedjax/text.py),
    so the text alone tells whether the thinking was closed.
    """

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    prompt_tokens: tuple[int, ...]
    policy_version: int = 0

    @property
    def truncated(self) -> bool:
        return self.finish_reason == FINISH_LENGTH


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions for text or chat requests with the current policy weights."""

    @property
    def version(self) -> int:
        """The policy version whose weights are loaded now."""
        ...

    def generate(self, requests: Sequence[Request], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """One completion per request, in order. Requests may share nothing but the params.

        Request i samples from the random stream (params.seed, i), or, with `seeds`, from its own
        stream seeds[i] (so that a request draws the same tokens whichever call it is part of: rollout
        workers split a step's groups over several calls)."""
        ...

    def load_weights(self, version: int, weights: Any = None) -> None:
        """Move to policy `version`. In-process engines take `weights` (a model or its state);
        engines fed by a weight store read `version` from it and ignore `weights`."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of a text under this engine's tokenizer (for budgets and reports)."""
        ...
