"""Benchmark of the JAX sampler's decode: qedjax vs transformers generate, time to first token, compiles.

1. Decode throughput. One random Hugging Face Qwen3 (fp32) is saved and loaded into qedjax with
   convert.load_hf, so both sides run the same weights. For each batch size, B random prompts of P
   tokens (equal lengths: no padding on either side) are continued greedily by exactly N tokens (no
   stop ids) with `Sampler.generate(temperature=0)`, with transformers `generate(do_sample=False)`
   and a static KV cache (`cache_implementation="static"`, P + N slots, as the sampler's), and with
   its default dynamic cache. "call" is B * N / (wall time of a whole call: prefill + N tokens,
   results on the host); "decode" is B * (N - 1) / (that time - the time of the same call with
   max_new_tokens=1), the rate once the prompt is in the cache. Compiles and first calls are
   excluded; rounds rotate which side goes first. The greedy tokens of both sides are compared (fp32 rounding can flip a
   near tie, after which a row diverges; the share of equal tokens is printed).
2. Time to first token: one prompt of P tokens, max_new_tokens=1 (prefill + one sample).
3. Compile count: a sampler on the `tiny` preset (compile time does not depend on width) serves
   `--compile-calls` requests with random batch sizes (1..32) and prompt lengths (1..300). Printed:
   the distinct raw (batch, prompt) shapes, `len(sampler.compiled_shapes)`, the jit cache size, the
   backend compiles counted by jax.monitoring, and the bound from the buckets.
4. vLLM: when `import vllm` works (its CUDA build, or the CPU build `make venv` installs), prompts of
   the same shapes through `LLM.generate` on the same weights (ignore_eos, so exactly N tokens), as
   tokens/s per whole call beside qedjax's; otherwise a line says it was skipped.

Threads: `--threads N` pins the process to N cores and sets torch to N threads; XLA sizes its pool to
the cores it may use. The default is one: on a shared 2-core machine, transformers' decode with two
threads ran 4-10x slower than with one (small matmuls and a barrier per op while other jobs hold a core).

On a CPU, torch runs on the CPU; when CUDA is available, transformers runs there and jax uses its
default backend. Timings on a shared machine are noisy: medians over rounds, best in brackets.

With `--temperature T` both sides sample instead (no top-k/top-p; transformers with min_new_tokens so
that no row ends early); the token comparison then means nothing. `--vocab 151936` gives the model
Qwen3's vocabulary, where the cost of drawing a token shows.

Usage:
  .venv/bin/python tools/bench_rollout.py                   # bench-100m shape cut to 4 layers, P=32 N=64
  .venv/bin/python tools/bench_rollout.py --batch 32 --temperature 0.8 --vocab 151936 --skip-compile-count
  .venv/bin/python tools/bench_rollout.py --layers 12 --batch 32 --new 128 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

from benchlib import ROOT, pin_threads, print_footer, print_header  # tools/, the script's own folder

SIDES = ("qedjax", "hf-static", "hf-dynamic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-100m")
    p.add_argument("--layers", type=int, default=4, help="override the preset's depth (0: keep it)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens P")
    p.add_argument("--new", type=int, default=64, help="generated tokens N")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side and batch size")
    p.add_argument("--compile-calls", type=int, default=20)
    p.add_argument("--skip-compile-count", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="cores for both frameworks (1 by default: on a shared machine torch's decode with "
                        "more threads than idle cores collapses)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy on both sides; > 0: both sides sample at this temperature (no top-k/top-p)")
    p.add_argument("--vocab", type=int, default=0, help="override the preset's vocabulary (Qwen3: 151936)")
    return p.parse_args(argv)


def model_config(args):
    from qedjax.models.qwen3 import Qwen3Config

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    return Qwen3Config.preset(args.preset, **overrides)


def timed(call):
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def bench_decode(args) -> tuple[list[dict], dict]:
    import jax
    import numpy as np
    import torch

    from qedjax import convert
    from qedjax.rollout.sampler import Sampler

    sys.path.insert(0, ROOT)
    from tests.hf_utils import random_hf_model

    cfg = model_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = random_hf_model(cfg).eval()
    tmp = tempfile.TemporaryDirectory(prefix="bench-rollout-")
    hf.save_pretrained(tmp.name)
    model = convert.load_hf(tmp.name, dtype="float32")
    hf = hf.to(device)
    sampler = Sampler(model)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"# {args.preset} with {cfg.num_hidden_layers} layers: {n_params / 1e6:.1f}M params, fp32, "
          f"vocab {cfg.vocab_size}, {'greedy' if args.temperature <= 0 else f'sampled at T={args.temperature}'}, "
          f"P={args.prompt} N={args.new}; torch {torch.__version__} on {device} ({torch.get_num_threads()} threads, "
          f"attn={hf.config._attn_implementation}), jax {jax.__version__} on {jax.devices()[0].platform}",
          flush=True)
    rng = np.random.default_rng(0)

    def run_qedjax(prompts, new):
        out = sampler.generate(prompts, max_new_tokens=new, temperature=args.temperature)
        return np.asarray([r.tokens for r in out])

    def run_hf(prompts, new, cache):
        ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
        kwargs = {"cache_implementation": "static"} if cache == "static" else {}
        with torch.no_grad():
            # Sampling may draw the EOS id, which would end a row early: min_new_tokens masks it.
            sampling = (dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, min_new_tokens=new)
                        if args.temperature > 0 else dict(do_sample=False))
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, pad_token_id=0,
                              **sampling, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].cpu().numpy()

    calls = {"qedjax": run_qedjax, "hf-static": lambda p, n: run_hf(p, n, "static"),
             "hf-dynamic": lambda p, n: run_hf(p, n, "dynamic")}
    rows = []
    for b in args.batch:
        prompts = rng.integers(1, cfg.vocab_size, (b, args.prompt)).tolist()
        first = {side: timed(lambda: call(prompts, args.new)) for side, call in calls.items()}
        outs = {side: out for side, (_, out) in first.items()}
        for side, out in outs.items():
            if out.shape != (b, args.new):
                raise SystemExit(f"{side} generated {out.shape}, expected {(b, args.new)}")
        for call in calls.values():
            call(prompts, 1)  # compile / warm up the prefill-only call
        times = {side: [] for side in calls}
        prefill = {side: [] for side in calls}
        for r in range(args.repeats):
            order = SIDES[r % 3:] + SIDES[:r % 3]
            for side in order:
                times[side].append(timed(lambda: calls[side](prompts, args.new))[0])
                prefill[side].append(timed(lambda: calls[side](prompts, 1))[0])
        row = dict(batch=b, new=args.new, tokens=b * args.new, first_s={k: v[0] for k, v in first.items()},
                   times=times, prefill=prefill,
                   equal=float(np.mean(outs["qedjax"] == outs["hf-static"])),
                   equal_first=float(np.mean(outs["qedjax"][:, 0] == outs["hf-static"][:, 0])))
        rows.append(row)
        print_decode_row(row, header=len(rows) == 1)

    prompt = [rng.integers(1, cfg.vocab_size, args.prompt).tolist()]
    ttft = {side: [] for side in calls}
    for side, call in calls.items():
        call(prompt, 1)  # compile / warm up
    for r in range(max(args.repeats, 5)):
        for side in SIDES[r % 3:] + SIDES[:r % 3]:
            ttft[side].append(timed(lambda: calls[side](prompt, 1))[0])
    print(f"# time to first token, 1 prompt of {args.prompt} tokens, max_new_tokens=1 (median [best]): " +
          ", ".join(f"{s} {1e3 * statistics.median(v):.1f} [{1e3 * min(v):.1f}] ms" for s, v in ttft.items()),
          flush=True)
    if args.temperature > 0:
        bench_draw(max(args.batch), cfg.vocab_size, args.repeats)
    bench_vllm(args, tmp.name, rng, cfg, rows)
    tmp.cleanup()
    return rows, ttft


def print_decode_row(row: dict, header: bool):
    b, n = row["batch"], row["new"]
    call = {k: [b * n / t for t in v] for k, v in row["times"].items()}
    decode = {k: [b * (n - 1) / max(t - p, 1e-9) for t, p in zip(row["times"][k], row["prefill"][k])]
              for k in row["times"]}
    ratio = lambda rates, k: statistics.median(j / t for j, t in zip(rates["qedjax"], rates[k]))  # noqa: E731
    if header:
        print(f"{'batch':>5} | {'rate':>6} | {'qedjax tok/s':>14} | {'hf static tok/s':>15} | {'hf dynamic tok/s':>16} | "
              f"{'vs static':>9} | {'vs dynamic':>10} | equal tokens (first)")
    for name, rates in (("call", call), ("decode", decode)):
        print(f"{b:>5} | {name:>6} | " + " | ".join(
            f"{statistics.median(rates[k]):>{w - 9}.0f} [{max(rates[k]):>6.0f}]"
            for k, w in (("qedjax", 14), ("hf-static", 15), ("hf-dynamic", 16)))
            + f" | {ratio(rates, 'hf-static'):>8.2f}x | {ratio(rates, 'hf-dynamic'):>9.2f}x | "
              + (f"{100 * row['equal']:.0f}% ({100 * row['equal_first']:.0f}%)" if name == "call" else ""),
              flush=True)
    print(f"# batch {b}: first qedjax call (compile) {row['first_s']['qedjax']:.1f} s", flush=True)


def bench_draw(batch: int, vocab: int, repeats: int):
    """The token draw alone, jitted, on [batch, vocab] logits: the sampler's two-level inverse CDF
    against Gumbel-max (jax.random.categorical), next to the log-softmax every step computes anyway."""
    import jax

    from qedjax.rollout.sampler import draw_tokens

    logits = jax.random.normal(jax.random.key(1), (batch, vocab))
    keys = jax.random.split(jax.random.key(0), batch)
    calls = {"draw_tokens": (jax.jit(draw_tokens), (keys, logits)),
             "random.categorical": (jax.jit(jax.vmap(jax.random.categorical)), (keys, logits)),
             "log_softmax": (jax.jit(lambda x: jax.nn.log_softmax(x, axis=-1)), (logits,))}
    times = {}
    for name, (fn, args) in calls.items():
        jax.block_until_ready(fn(*args))
        times[name] = statistics.median(timed(lambda: jax.block_until_ready(fn(*args)))[0]
                                        for _ in range(max(repeats, 5)))
    print(f"# token draw on [{batch}, {vocab}] (median ms): " +
          ", ".join(f"{k} {1e3 * v:.1f}" for k, v in times.items()), flush=True)


def bench_vllm(args, model_dir: str, rng, cfg, rows: list[dict]):
    """The same shapes through vllm.LLM on the same weights (its CUDA build, or the CPU build that
    `make venv` installs, eager and with a 1 GiB KV cache), beside qedjax's whole-call rate."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001  (any import failure means: no vLLM here)
        print(f"# vLLM: skipped (import failed: {type(e).__name__}: {str(e)[:80]})")
        return
    cpu = current_platform.is_cpu()
    extra = dict(kv_cache_memory_bytes=2**30) if cpu else {}
    t0 = time.perf_counter()
    llm = vllm.LLM(model=model_dir, tokenizer=None, skip_tokenizer_init=True, dtype="float32",
                   max_model_len=args.prompt + args.new, enforce_eager=cpu, seed=0, **extra)
    print(f"# vLLM {vllm.__version__} ({'CPU build, eager' if cpu else 'CUDA'}) started in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    params = vllm.SamplingParams(temperature=args.temperature, max_tokens=args.new, ignore_eos=True, detokenize=False)
    qedjax_rate = {r["batch"]: r["tokens"] / statistics.median(r["times"]["qedjax"]) for r in rows}
    for b in args.batch:
        prompts = [{"prompt_token_ids": p} for p in rng.integers(1, cfg.vocab_size, (b, args.prompt)).tolist()]
        llm.generate(prompts, params, use_tqdm=False)
        times = [timed(lambda: llm.generate(prompts, params, use_tqdm=False))[0] for _ in range(args.repeats)]
        rate = b * args.new / statistics.median(times)
        print(f"# vLLM batch {b}: {rate:.0f} [{b * args.new / min(times):.0f}] tok/s per whole call; qedjax "
              f"{qedjax_rate[b]:.0f} tok/s per call -> qedjax / vLLM {qedjax_rate[b] / rate:.2f}x", flush=True)
    llm.llm_engine.engine_core.shutdown()


def bench_compile_count(args) -> dict:
    import jax
    from flax import nnx

    from qedjax.models.qwen3 import Qwen3, Qwen3Config
    from qedjax.rollout.sampler import Sampler, bucket

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    sampler = Sampler(Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(0)))
    rnd = random.Random(0)
    raw, start = set(), time.perf_counter()
    before = len(compiles)
    for _ in range(args.compile_calls):
        b, p = rnd.randint(1, 32), rnd.randint(1, 300)
        raw.add((b, p))
        sampler.generate([[rnd.randint(1, 1000) for _ in range(p)] for _ in range(b)], max_new_tokens=8,
                         temperature=0.0)
    seconds = time.perf_counter() - start
    bound = len({bucket(b, minimum=1) for b in range(1, 33)}) * len({bucket(p) for p in range(1, 301)})
    out = dict(calls=args.compile_calls, raw_shapes=len(raw), compiled_shapes=len(sampler.compiled_shapes),
               jit_cache=sampler._generate._cache_size(), backend_compiles=len(compiles) - before, bound=bound,
               seconds=seconds)
    print(f"# compile count ({out['calls']} calls, tiny preset, batch 1..32, prompt 1..300, 8 new tokens): "
          f"{out['raw_shapes']} raw shapes -> compiled_shapes {out['compiled_shapes']}, jit cache "
          f"{out['jit_cache']}, backend compiles {out['backend_compiles']} (bucket bound {bound}); "
          f"{seconds:.0f} s", flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    pin_threads(args.threads)
    print_header()
    bench_decode(args)
    if not args.skip_compile_count:
        bench_compile_count(args)
    print_footer()


if __name__ == "__main__":
    main()
