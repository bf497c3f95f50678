"""The embedded rollout engine: the JAX sampler behind the RolloutEngine interface.

It renders chats with the tokenizer's chat template, samples with `Sampler`, and decodes the new
tokens. Weights come in-process: `load_weights(version, params)` takes the trainer's parameters
(any layout; they are resharded to the rollout layout).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from flax import nnx

from qedjax.models.qwen3 import Qwen3
from qedjax.rollout.engine import Completion, Request, SamplingParams
from qedjax.rollout.sampler import DECODE_CHUNK, Sampler
from qedjax.sharding import ROLLOUT_RULES
from qedjax.text import THINK_OPEN


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn and end-of-text ids the tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def render(tokenizer, request: Request) -> str:
    if isinstance(request, str):
        return request
    return tokenizer.apply_chat_template(list(request), tokenize=False, add_generation_prompt=True)


class JaxEngine:
    """RolloutEngine over an in-process Qwen3.

    Args:
      model: the policy (its current weights are version 0).
      tokenizer: a Hugging Face tokenizer with a chat template.
      mesh, rules, max_batch, decode_chunk: passed to the Sampler (rules: its parameter and cache layout).
    """

    def __init__(self, model: Qwen3, tokenizer, *, mesh=None, rules=ROLLOUT_RULES, max_batch: int = 256,
                 version: int = 0, decode_chunk: int = DECODE_CHUNK):
        self.tokenizer = tokenizer
        self.sampler = Sampler(model, mesh=mesh, rules=rules, max_batch=max_batch,
                               pad_id=tokenizer.pad_token_id or 0, decode_chunk=decode_chunk)
        self.stop_ids = stop_token_ids(tokenizer)
        self._version = version
        self._lock = threading.Lock()  # load_weights may run while another thread generates

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, version: int, weights: Any = None) -> None:
        if weights is None:
            raise ValueError("JaxEngine.load_weights needs the parameters (in-process engine)")
        if isinstance(weights, nnx.Module):
            weights = nnx.to_pure_dict(nnx.state(weights, nnx.Param))
        with self._lock:
            self.sampler.update(weights)
            self._version = version

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, requests: Sequence[Request]) -> tuple[list[str], list[list[int]]]:
        texts = [render(self.tokenizer, r) for r in requests]
        return texts, [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def generate(self, requests: Sequence[Request], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        texts, prompts = self.encode(requests)
        with self._lock:  # one version for the whole call
            version, weights = self._version, self.sampler.params
        results = self.sampler.generate(prompts, max_new_tokens=params.max_new_tokens,
                                        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                        stop_ids=self.stop_ids, params=weights,
                                        seed=params.seed if seeds is None else list(seeds))
        out = []
        for text, prompt, r in zip(texts, prompts, results):
            body = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens
            decoded = self.tokenizer.decode(body, skip_special_tokens=False)
            if text.rstrip().endswith(THINK_OPEN):  # the template opened the think block
                decoded = THINK_OPEN + "\n" + decoded
            out.append(Completion(text=decoded, tokens=tuple(r.tokens), logprobs=tuple(r.logprobs),
                                  finish_reason=r.finish_reason, prompt_tokens=tuple(prompt),
                                  policy_version=version))
        return out
