"""Proof of fit: compile a config's programs for a TPU topology on this (CPU) machine, no TPU needed.

`python -m qedjax.launch --config C [--mesh ...] --compile-only v5p-8` builds the mesh of the run
over the chips of a TPU topology description (a slice as Google names it, v5p-8, or a topology,
v5p:2x2x1) (libtpu's compiler, loaded by
jax.experimental.topologies), gives every program its arguments as ShapeDtypeStructs with their
NamedShardings, and compiles it with `jit(...).lower(...).compile()`: the TPU compiler schedules
for the chip's memory and fails with RESOURCE_EXHAUSTED where the real chip would. Nothing is
allocated and no weights or data are read.

The programs are the stages' own, built by the functions the stages call, at the config's shapes:
  sft step      sft.make_step on [micro_batches, global_batch / micro_batches, seq_len]
  grpo step     rl.make_step on rl.batch_shapes at T = prompt + sampling.max_new_tokens (bucketed)
  rollout       the JAX sampler's prefill + decode program (sampler.make_generate) for the rollout
                mesh and its KV cache, at min(requests, engine.max_batch) rows (engine.kind=jax)
  rc summary    the same program at the RC summariser's shapes (prompt + reasoning in, summary out)
  eval rollout  the eval stage's sampler program (engine.kind=jax)
A program's own peak is not all a chip holds while it runs: the GRPO stage keeps the train state
and the in-process engines' parameter copies alive side by side, and in async mode the rollout
runs while the train step does. `held` adds what else is resident (computed from the arrays' shapes
and shardings) and the verdict is on the sum.

Prompt length is not in the config: `--prompt-tokens` (default 1024; with RC, plus the summary)
stands for the longest prompt. FLOP counts from the TPU compiler undercount loops (scan,
while_loop): no throughput or MFU is derived here (tools/tpu_cost.py estimates them from loop-free
programs).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax

# HBM per chip by TPU generation, in GiB, from Google Cloud's TPU system-architecture pages.
# The compiler's own limit is a little lower (it reports 15.75G of v5e's 16 GiB as available).
TPU_HBM_GIB = {
    "v4": (32, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": (16, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": (95, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": (32, "https://cloud.google.com/tpu/docs/v6e"),
}
GIB = 1 << 30
DEFAULT_PROMPT_TOKENS = 1024

# Google's slice names (cloud.google.com/tpu/docs/v5p and /v4: v5p-N and v4-N count TensorCores, two
# per chip, so a v5p-8 is 4 chips; /v5e and /v6e: v5e-N and v6e-N count chips) and the topology of
# each size, by chips.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
               512: "8x8x8"}
TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology(target: str) -> str:
    """A slice name as Google gives it (v5p-8) or a topology (v5p:2x2x1) -> the topology."""
    if ":" in target or "-" not in target:
        return target
    generation, _, size = target.partition("-")
    if generation not in CORES_PER_CHIP or not size.isdigit():
        return target  # hbm_bytes names what is known
    chips = int(size) // CORES_PER_CHIP[generation]
    shapes = TOPOLOGY_3D if generation in ("v4", "v5p") else TOPOLOGY_2D
    if int(size) % CORES_PER_CHIP[generation] or chips not in shapes:
        raise ValueError(f"--compile-only {target!r}: no {generation} slice of that size; known: "
                         f"{', '.join(slice_name(f'{generation}:{t}') for t in shapes.values())}")
    return f"{generation}:{shapes[chips]}"


def slice_name(target: str) -> str:
    """v5p:2x2x1 -> v5p-8: the slice as Google names it (TensorCores for v4/v5p, chips for v5e/v6e)."""
    generation, _, shape = topology(target).partition(":")
    if generation not in CORES_PER_CHIP or not shape:
        return target
    return f"{generation}-{math.prod(int(x) for x in shape.split('x')) * CORES_PER_CHIP[generation]}"


@dataclasses.dataclass
class Program:
    name: str
    fn: object  # a jax.jit-wrapped function
    args: tuple  # ShapeDtypeStructs (with shardings) and static values, as fn.lower takes them
    held: dict  # what else is resident on each chip while it runs: name -> bytes per chip
    alongside: str = ""  # the kind of program that runs at the same time (async GRPO: "rollout")
    peak: int = 0  # bytes per chip, from the compiler
    memory: object = None
    compiled: object = None
    error: str = ""
    compile_s: float = 0.0

    @property
    def total(self) -> int:
        return self.peak + sum(self.held.values())


def hbm_bytes(target: str) -> int:
    generation = topology(target).split(":")[0]
    if generation not in TPU_HBM_GIB:
        raise ValueError(f"--compile-only {target!r}: unknown TPU generation {generation!r}; known: "
                         f"{sorted(TPU_HBM_GIB)} (e.g. v5p-8 = v5p:2x2x1, v6e-8 = v6e:2x4, v5e-4 = v5e:2x2). GPU targets are not "
                         f"supported (docs/FIT.md says why)")
    return TPU_HBM_GIB[generation][0] * GIB


def _load_libtpu() -> None:
    """Points JAX at libtpu. `make fit-tools` installs it beside the venv (.venv/libtpu), outside
    site-packages, so that CPU runs and tests never see it and never probe for a TPU."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel fit checks and tests
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata on this machine
    beside = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    if "TPU_LIBRARY_PATH" not in os.environ and os.path.isfile(beside):
        os.environ["TPU_LIBRARY_PATH"] = beside


def topology_devices(target: str):
    """The compile-only device descriptions of a TPU slice such as 'v5p-8' (= 'v5p:2x2x1')."""
    hbm_bytes(target)
    target = topology(target)
    _load_libtpu()
    if not jax.config.jax_platforms:  # the local backend stays the CPU, even on a TPU VM
        jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=target, platform="tpu").devices
    except RuntimeError as e:
        if "not installed" in str(e):
            raise RuntimeError("libtpu is not installed: run `make fit-tools` (or pip install 'jax[tpu]')") from e
        raise


def target_mesh(target: str, spec: str):
    """The run's mesh (run.mesh / --mesh) over the chips of the target topology."""
    from qedjax import sharding

    return sharding.make_mesh(spec, devices=topology_devices(target))


def shard_bytes(tree) -> int:
    """Bytes per chip of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _model_cfg(model_cfg):
    """The model section, with a missing checkpoint directory replaced by the preset it names
    (checkpoints/Qwen3-4B-Thinking-2507 -> qwen3-4b-thinking-2507): fit needs no weights."""
    from qedjax.models.qwen3 import PRESETS

    path = model_cfg.hf_path
    if path and "://" not in path and not os.path.isfile(os.path.join(path, "config.json")):
        name = os.path.basename(path.rstrip("/")).lower()
        if name not in PRESETS:
            raise FileNotFoundError(f"model.hf_path {path!r} has no config.json and names no preset "
                                    f"({sorted(PRESETS)}): fit needs the architecture")
        return dataclasses.replace(model_cfg, hf_path=None, preset=name)
    return model_cfg


def _train_state(model_cfg, optim, steps: int, mesh, rules, layers=None):
    from qedjax import train
    from qedjax.optim import make_optimizer

    _, graphdef, params = train.abstract_params(model_cfg, mesh, rules, layers=layers)
    optimizer = make_optimizer(optim, steps)
    shardings = train.state_shardings(params, optimizer, mesh)
    return graphdef, optimizer, shardings, train.abstract_state(shardings, params, optimizer)


def _engine_copy(config, params):
    """An engine's parameter copy as the sampler keeps it (sampler.engine_dtype: matrices in the
    compute dtype)."""
    from qedjax.rollout.sampler import engine_dtype

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, engine_dtype(x.dtype, x.ndim, config.dtype),
                                                       sharding=x.sharding), params)


def _engine_params(model_cfg, mesh, rules=None, layers=None):
    """An in-process engine's parameter copy (rollout layout unless `rules` says otherwise)."""
    from qedjax import train
    from qedjax.sharding import ROLLOUT_RULES

    config, _, params = train.abstract_params(model_cfg, mesh, rules or ROLLOUT_RULES, layers=layers)
    return _engine_copy(config, params)


def _sampler_program(name, model_cfg, mesh, requests: int, max_batch: int, prompt: int, sampling, held,
                     layers=None, rules=None):
    from qedjax import train
    from qedjax.rollout import sampler
    from qedjax.sharding import ROLLOUT_RULES

    rules = rules or ROLLOUT_RULES
    config, graphdef, params = train.abstract_params(model_cfg, mesh, rules, layers=layers)
    params = _engine_copy(config, params)
    b, p, new = sampler.padded_shape(min(requests, max_batch), prompt, sampling.max_new_tokens, mesh, rules)
    fn = sampler.make_generate(config, graphdef, mesh, rules, pad_id=0)
    args = (params, *sampler.input_shapes(b, p, mesh, rules), new, sampling.top_k > 0, sampling.top_p < 1.0)
    return Program(f"{name} [{b} x {p} + {new}]", fn, args, held)


def programs(cfg, mesh, stages, prompt_tokens: int | None = None, layers: int | None = None) -> list[Program]:
    """The programs the selected stages of `cfg` compile, with their abstract arguments.

    `layers`: build them for a model cut to that many blocks (what else is resident, `held`, is
    always computed at the model's full depth).
    """
    from qedjax import rl, sft
    from qedjax.sharding import SUMMARIZER_RULES, TRAIN_RULES

    model_cfg = _model_cfg(cfg.model)
    out = []
    if cfg.sft is not None and "sft" in stages:
        s = cfg.sft
        graphdef, optimizer, shardings, state = _train_state(model_cfg, s.optim, s.steps or 1000, mesh, TRAIN_RULES,
                                                             layers)
        batch = sft.batch_shapes(s, mesh, TRAIN_RULES)
        fn = sft.make_step(graphdef, optimizer, shardings, mesh, TRAIN_RULES)
        rows = s.global_batch // s.micro_batches
        out.append(Program(f"sft step [{s.micro_batches} x {rows} x {s.data.seq_len}]", fn, (state, batch), {}))
    if cfg.grpo is not None and "grpo" in stages:
        g = cfg.grpo
        prompt = prompt_tokens or DEFAULT_PROMPT_TOKENS + (g.rc.summary_max_new_tokens if g.rc.enabled else 0)
        graphdef, optimizer, shardings, state = _train_state(model_cfg, g.optim, g.steps, mesh, TRAIN_RULES, layers)
        seq = rl.train_seq_len(prompt + g.sampling.max_new_tokens - 1)
        batch = rl.batch_shapes(g, mesh, TRAIN_RULES, seq)
        fn = rl.make_step(g, graphdef, optimizer, shardings, mesh, TRAIN_RULES)
        rows = rl.train_rows(g, mesh, TRAIN_RULES) // g.micro_batches
        in_process = cfg.engine.kind == "jax"
        # The engines' parameter copies: the policy's (rollout layout) and a summariser's of its own
        # (frozen, or another model, taken to be the policy's size as the release's 4B instruct model
        # is; sharded as in training, SUMMARIZER_RULES).
        own = in_process and g.rc.enabled and g.rc.summarizer != "policy"
        policy = {"policy engine's params": shard_bytes(_engine_params(model_cfg, mesh))} if in_process else {}
        summarizer = ({"summariser engine's params (fsdp-sharded)":
                       shard_bytes(_engine_params(model_cfg, mesh, SUMMARIZER_RULES))} if own else {})
        step = Program(f"grpo step [{g.micro_batches} x {rows} x {seq}]", fn, (state, batch),
                       {**policy, **summarizer})
        out.append(step)
        if in_process:
            train_state = {"train state": shard_bytes(_train_state(model_cfg, g.optim, g.steps, mesh, TRAIN_RULES)[3])}
            rollout = _sampler_program("rollout", model_cfg, mesh, g.sequences_per_step, cfg.engine.max_batch,
                                       prompt, g.sampling, {**train_state, **summarizer}, layers)
            out.append(rollout)
            if g.rc.enabled:  # the summariser's program; the policy's copy is held beside it when it is another engine
                summary = dataclasses.replace(g.sampling, max_new_tokens=g.rc.summary_max_new_tokens)
                out.append(_sampler_program("rc summary", model_cfg, mesh, g.problems_per_step, cfg.engine.max_batch,
                                            prompt + g.sampling.max_new_tokens, summary,
                                            {**train_state, **(policy if own else {})}, layers,
                                            SUMMARIZER_RULES if own else None))
            if g.mode == "async":  # rollouts run in a thread while the trainer trains
                step.alongside = "rollout"
    if cfg.eval is not None and "eval" in stages and cfg.engine.kind == "jax":
        e = cfg.eval
        copy = shard_bytes(_engine_params(model_cfg, mesh))
        # A scaffold call generates for batch_size units at most (single: one request each);
        # pipeline.run_evals keeps the target's params while its engine holds a copy.
        out.append(_sampler_program("eval rollout", model_cfg, mesh, e.batch_size, cfg.engine.max_batch,
                                    prompt_tokens or DEFAULT_PROMPT_TOKENS, e.sampling, {"eval target params": copy},
                                    layers))
    return out


@dataclasses.dataclass(frozen=True)
class Memory:
    """A compiled program's memory per chip, in bytes (from compiled.memory_analysis())."""

    arguments: int
    outputs: int
    aliased: int  # outputs written in place of donated arguments
    temporaries: int
    compiler_peak: int

    @property
    def peak(self) -> int:
        """The compiler's peak: what it checks against the chip's HBM (it refuses a program above it).
        Not the sum arguments + outputs - aliased + temporaries: temporaries do not all live at once
        (the 4B SFT step at 49k tokens compiled for a 95 GiB v5p chip with 97.7 GiB of temporaries and
        an 89.2 GiB peak). The sum stands in only where a backend reports no peak."""
        return self.compiler_peak or self.arguments + self.outputs - self.aliased + self.temporaries


MIB = 2**20


def compile_program(p: Program, limit: int | None = None) -> Program:
    """Compiles `p`; with `limit`, for a chip with only that many bytes of HBM (libtpu's
    xla_tpu_max_hbm_size_mib): the compiler must schedule the program into what is left beside the
    arrays it does not own (`held`), and refuses it where the chip would run out."""
    t0 = time.perf_counter()
    # A compile-only executable cannot be read back from JAX's persistent cache (there is no TPU
    # client to load it into): keep it out, rather than warn on every later read.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    options = {"xla_tpu_max_hbm_size_mib": str(limit // MIB)} if limit is not None else {}
    try:
        if limit is not None and limit <= 0:
            raise ValueError(f"RESOURCE_EXHAUSTED: what the stage holds beside the program already fills the "
                             f"chip's HBM ({limit / GIB:.2f} GiB left)")
        compiled = p.fn.lower(*p.args).compile(compiler_options=options)
    except Exception as e:  # the TPU compiler's RESOURCE_EXHAUSTED, and anything else it refuses
        p.error = str(e)
    else:
        m = compiled.memory_analysis()
        p.compiled = compiled
        p.memory = Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                          m.temp_size_in_bytes, m.peak_memory_in_bytes)
        p.peak = p.memory.peak
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    p.compile_s = time.perf_counter() - t0
    return p


def extrapolate(shallow: Program, deeper: Program, a: int, b: int, depth: int) -> Program:
    """The program at `depth` blocks from compiles at a < b blocks, every figure linear in depth (the
    blocks are identical: per block, its parameters, optimizer state, saved activations and KV cache).
    A compiler refusal at either depth stands for the full depth.

    A triage, not a verdict: the compiler plans to the chip's memory, and a shallow copy leaves it
    room to keep more per block than it would keep at full depth (the 4B SFT step at 49k tokens
    extrapolated from 2 and 4 blocks to a 177 GiB peak per chip; compiled whole: 89 GiB).
    """
    if shallow.error or deeper.error:
        return deeper if deeper.error else shallow
    grow = lambda x, y: x + (y - x) * (depth - a) // (b - a)  # noqa: E731
    m = Memory(*(grow(x, y) for x, y in zip(dataclasses.astuple(shallow.memory), dataclasses.astuple(deeper.memory))))
    return dataclasses.replace(deeper, memory=m, peak=m.peak, compiled=None,
                               compile_s=shallow.compile_s + deeper.compile_s,
                               name=f"{deeper.name} (extrapolated from {a} and {b} of {depth} blocks)")


def _kind(p: Program) -> str:
    return p.name.split(" [")[0]


def _add_alongside(p: Program, progs: list[Program]) -> None:
    """A program that shares the chips with another (async GRPO: step and rollout) also holds that
    one's temporaries and outputs; its arguments (one engine's params) are already in `held`."""
    other = {_kind(q): q for q in progs}.get(p.alongside)
    if other is not None and other.memory is not None:
        p.held[f"{p.alongside} running alongside (async): temporaries + outputs"] = other.peak - other.memory.arguments


def compile_order(progs: list[Program]) -> list[Program]:
    """Programs that run alongside another are compiled after it (its memory is part of their budget)."""
    after = {p.alongside for p in progs if p.alongside}
    return [p for p in progs if _kind(p) in after] + [p for p in progs if _kind(p) not in after]


def largest_arguments(p: Program, n: int = 5) -> list[tuple[str, int]]:
    leaves = jax.tree_util.tree_flatten_with_path(p.args)[0]
    sized = [(jax.tree_util.keystr(path), shard_bytes(leaf)) for path, leaf in leaves
             if isinstance(leaf, jax.ShapeDtypeStruct)]
    return sorted(sized, key=lambda x: -x[1])[:n]


def _gib(x: int) -> str:
    return f"{x / GIB:.2f} GiB"


def report(cfg, mesh, stages, target: str, prompt_tokens: int | None = None, layers: tuple[int, int] | None = None,
           out=print) -> int:
    """Compiles every program, prints peak per chip vs HBM and a verdict; 0 if all fit, else 1.

    `layers` (a, b): compile each program for the model cut to a and to b blocks and extrapolate to
    its depth (minutes instead of tens of minutes for a 4B model on a small CPU machine).
    """
    from qedjax import train
    from qedjax.sharding import format_mesh

    hbm = hbm_bytes(target)
    if layers is None:
        progs = programs(cfg, mesh, stages, prompt_tokens)
    else:
        a, b = sorted(layers)
        progs = list(zip(programs(cfg, mesh, stages, prompt_tokens, a), programs(cfg, mesh, stages, prompt_tokens, b)))
    if not progs:
        out(f"[fit] no program to compile for stages {', '.join(stages)} (engine.kind={cfg.engine.kind})")
        return 0
    out(f"[fit] {slice_name(target)} ({topology(target)}): {len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind}, "
        f"{_gib(hbm)} HBM per chip ({TPU_HBM_GIB[topology(target).split(':')[0]][1]}); mesh {format_mesh(mesh)}")
    if layers is not None:
        depth = train.model_config(_model_cfg(cfg.model)).num_hidden_layers
        for pair in progs:
            for p, n in zip(pair, (a, b)):
                out(f"[fit] compiling {p.name} at {n} blocks ...")
                compile_program(p)
                out(f"[fit]     {n} blocks: " + (f"peak {_gib(p.peak)} per chip ({p.compile_s:.0f} s)" if not p.error
                                                 else "refused by the compiler"))
        progs = [extrapolate(x, y, a, b, depth) for x, y in progs]
        for p in progs:
            _add_alongside(p, progs)
    else:
        for p in compile_order(progs):
            _add_alongside(p, progs)
            held = sum(p.held.values())
            out(f"[fit] compiling {p.name}" + (f" for the {_gib(hbm - held)} of HBM left beside what the stage "
                                               f"holds ({_gib(held)})" if held else "") + " ...")
            compile_program(p, hbm - held)
    ok = True
    for p in progs:
        if p.error:
            ok = False
            first = p.error.strip().splitlines()[0]
            out(f"[fit] {p.name}: DOES NOT FIT: the compiler refused it ({p.compile_s:.0f} s): {first}")
            detail = [ln for ln in p.error.splitlines()[1:] if ln.strip()][:24]
            for line in detail:
                out(f"[fit]     {line}")
            _print_arguments(p, out)
            continue
        m = p.memory
        fits = p.total <= hbm
        ok &= fits
        out(f"[fit] {p.name}: peak {_gib(p.peak)} per chip (arguments {_gib(m.arguments)}, temporaries "
            f"{_gib(m.temporaries)}, outputs {_gib(m.outputs)}, aliased {_gib(m.aliased)}; compiler's peak "
            f"{_gib(m.compiler_peak)}; compiled in {p.compile_s:.0f} s)")
        for name, b in p.held.items():
            out(f"[fit]     + {name}: {_gib(b)}")
        verdict = "fits" if fits else "DOES NOT FIT"
        if "extrapolated" in p.name:
            verdict += " (extrapolated: compile it whole, without --fit-layers, for the verdict)"
        out(f"[fit]     = {_gib(p.total)} of {_gib(hbm)}: headroom {_gib(hbm - p.total)}: {verdict}")
        if not fits:
            _print_arguments(p, out)
    out(f"[fit] verdict: {'fits' if ok else 'DOES NOT FIT'} on {slice_name(target)} ({topology(target)})")
    return 0 if ok else 1


def _print_arguments(p: Program, out) -> None:
    out(f"[fit]     largest arguments per chip of {p.name} (before padding to the chip's tiles):")
    for name, b in largest_arguments(p):
        out(f"[fit]       {_gib(b):>12}  {name}")
