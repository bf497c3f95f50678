"""Tiny random Hugging Face Qwen3 models for parity tests (built locally, nothing downloaded)."""

from __future__ import annotations

import torch
import transformers

from qedjax import convert
from qedjax.models.qwen3 import Qwen3Config


def hf_config(cfg: Qwen3Config) -> transformers.Qwen3Config:
    return convert.hf_config(cfg)


def random_hf_model(cfg: Qwen3Config, seed: int = 0) -> transformers.Qwen3ForCausalLM:
    """A Qwen3ForCausalLM in fp32 with random weights, norms included (HF inits them to ones)."""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_config(cfg)).eval().to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_random_hf(cfg: Qwen3Config, path, seed: int = 0, **save_kwargs) -> transformers.Qwen3ForCausalLM:
    model = random_hf_model(cfg, seed)
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model, tokens) -> "numpy.ndarray":
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
