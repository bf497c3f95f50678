"""Checks what `make demo` promises, on its run directory: CI runs this after the demo.

    python tools/check_demo.py [RUN_DIR]      (default runs/tiny)

Passes (exit 0) when the run wrote summary.json, each evaluated model beats the one before it
(base < SFT < GRPO) by more than `--min-se` standard errors of the paired difference, and the
exported `hf/` directory loads in transformers and gives finite logits for a chat prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def check(run_dir: str, min_se: float) -> list[str]:
    problems = []
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return [f"{path} is missing: the demo did not finish"]
    with open(path) as f:
        summary = json.load(f)
    for name in ("base", "sft", "grpo"):
        if name not in summary.get("stages", {}):
            problems.append(f"{path}: no evaluation of {name!r}")
    for name in ("sft-base", "grpo-sft"):
        d = summary.get("differences", {}).get(name)
        if d is None:
            problems.append(f"{path}: no paired difference {name!r}")
        elif not d["diff"] > min_se * d["stderr"] or d["diff"] <= 0:
            problems.append(f"{name}: {d['diff']:+.1f} points is not more than {min_se} standard errors "
                            f"({d['stderr']:.1f}) over {d['problems']} problems")
        else:
            print(f"[check_demo] {name}: {d['diff']:+.1f} points = {d['diff'] / max(d['stderr'], 1e-9):.1f} "
                  f"standard errors over {d['problems']} problems")
    problems += check_export(os.path.join(run_dir, "hf"))
    return problems


def check_export(hf_dir: str) -> list[str]:
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        return [f"{hf_dir}: no exported model"]
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "1 2 3 4 5 6 7"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        return [f"{hf_dir}: non-finite logits"]
    print(f"[check_demo] {hf_dir}: {type(model).__name__} loads in transformers; logits {tuple(logits.shape)} finite")
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", default="runs/tiny")
    p.add_argument("--min-se", type=float, default=2.0)
    args = p.parse_args(argv)
    problems = check(args.run_dir, args.min_se)
    for line in problems:
        print(f"[check_demo] FAIL {line}")
    if not problems:
        print("[check_demo] ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
