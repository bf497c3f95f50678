"""Proof of fit (qedjax/fit.py): the SFT step compiled for a TPU topology by libtpu's compiler, no TPU.

libtpu comes from `make fit-tools` (beside the venv, where CPU runs never load it) or from
`pip install 'jax[tpu]'`; without it these tests skip, saying so.
"""

import math
import os
import sys

import pytest

from qedjax import fit
from qedjax.config import load_config
from qedjax.sharding import TRAIN_RULES

TARGET = "v5e:2x2"  # 4 chips of 16 GiB


def _libtpu_path():
    beside = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    if os.environ.get("TPU_LIBRARY_PATH") or os.path.isfile(beside):
        return True
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _libtpu_path(), reason="libtpu is not installed: `make fit-tools` "
                                                           "(or pip install 'jax[tpu]') enables these tests")

SMALL = ["model.preset=tiny", "run.stages=[sft]", "sft.global_batch=8", "sft.micro_batches=2",
         "sft.data.seq_len=128"]


@pytest.fixture(scope="module")
def mesh():
    return fit.target_mesh(TARGET, "fsdp=4")


def _shard_bytes(leaf, layout=None):
    """Bytes of one chip's shard, from the global shape and the PartitionSpec; with a TPU layout, the
    shard's dimensions in memory order, the minor ones padded up to the layout's tile (a scalar is
    one element of a rank-1 tile)."""
    shape = list(leaf.shape)
    for dim, axes in enumerate(leaf.sharding.spec):
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            shape[dim] //= leaf.sharding.mesh.shape[axis]
    if layout is not None:
        shape = [shape[i] for i in layout.major_to_minor] or [1]
        for k, t in enumerate(reversed(layout.tiling[0] if layout.tiling else ())):
            shape[-1 - k] = -(-shape[-1 - k] // t) * t
    return math.prod(shape) * leaf.dtype.itemsize


def test_sft_step_memory_is_its_arrays(mesh):
    import jax

    # The XLA attention: splash's block tables are constants, which jax hoists into extra arguments
    # of the executable (over 32 bytes each), outside the step's own arguments counted here.
    cfg = load_config(None, SMALL + ["model.attention=xla"])
    [program] = fit.programs(cfg, mesh, ("sft",))
    fit.compile_program(program)
    assert not program.error, program.error
    m = program.memory
    state, batch = program.args
    params = jax.tree.leaves(state["params"])
    # fp32 params and two Adam moments of the same shards, plus int32 scalars (step, optimizer counts)
    scalars = [x for x in jax.tree.leaves(state) if x.ndim == 0]
    state_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(state))
    assert state_bytes == 3 * sum(_shard_bytes(x) for x in params) + 4 * len(scalars)
    # 5 int32 arrays of [2 micro-batches, 4 rows, 128]: rows over the 4 fsdp chips
    assert sum(_shard_bytes(x) for x in batch.values()) == 5 * 2 * 1 * 128 * 4
    # On the chip every shard is laid out in tiles ((8, 128) for these matrices): the argument bytes
    # are exactly the shards' bytes padded to the layouts the compiler chose, no more.
    leaves = jax.tree.leaves(program.args)
    layouts = [f.layout for f in jax.tree.leaves(program.compiled.input_formats)]
    assert len(layouts) == len(leaves)
    padded = [_shard_bytes(x, lay) for x, lay in zip(leaves, layouts)]
    assert m.arguments == sum(padded)
    assert sum(padded) >= state_bytes + 5 * 2 * 128 * 4
    # the donated state comes back in place: outputs that alias the state's arguments
    state_padded = sum(padded[:len(jax.tree.leaves(state))])
    assert m.aliased == state_padded
    assert program.peak == m.compiler_peak >= m.arguments


def test_oversized_config_does_not_fit(mesh, tmp_path):
    import json

    from qedjax.models.qwen3 import Qwen3Config

    # the tiny model with a 2^27-token vocabulary: its embedding alone is 2^27 x 64 fp32 = 32 GiB,
    # 8 GiB per chip, three times over with Adam's moments: more than a 16 GiB v5e chip holds
    (tmp_path / "config.json").write_text(json.dumps(Qwen3Config.preset("tiny", vocab_size=1 << 27).to_hf()))
    cfg = load_config(None, [f"model.hf_path={tmp_path}"] + SMALL[1:])
    lines = []
    assert fit.report(cfg, mesh, ("sft",), TARGET, out=lines.append) == 1
    text = "\n".join(lines)
    assert "sft step [2 x 4 x 128]: DOES NOT FIT" in text
    assert "RESOURCE_EXHAUSTED" in text  # the compiler's own refusal
    assert "largest arguments per chip" in text
    assert "8.00 GiB  [0]['params']['embed_tokens']" in text
    assert text.endswith("verdict: DOES NOT FIT on v5e-4 (v5e:2x2)")


def test_launch_compile_only_checks_the_config_first():
    from qedjax import launch

    # 8 rows / 4 micro-batches = 2 rows, not divisible over fsdp=4: an error before anything compiles
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        launch.main(["--config", "configs/tiny.yaml", "--mesh", "fsdp=4", "--compile-only", TARGET,
                     "--stage", "sft", "sft.global_batch=8", "sft.micro_batches=4"])
    with pytest.raises(ValueError, match="unknown TPU generation"):
        launch.main(["--config", "configs/tiny.yaml", "--compile-only", "h100x8"])


def test_a_program_is_compiled_for_the_memory_left_beside_what_is_held(mesh):
    """With a budget (the chip's HBM less what the stage holds beside the program), the compiler
    refuses a program that would fit an empty chip but not the room that is left."""
    cfg = load_config(None, SMALL)
    [alone] = fit.programs(cfg, mesh, ("sft",))
    fit.compile_program(alone)
    assert not alone.error and alone.peak > 2 * fit.MIB
    [roomy] = fit.programs(cfg, mesh, ("sft",))
    fit.compile_program(roomy, limit=alone.peak + 64 * fit.MIB)
    assert not roomy.error and roomy.peak == alone.peak
    [tight] = fit.programs(cfg, mesh, ("sft",))
    fit.compile_program(tight, limit=alone.peak - fit.MIB)
    assert "RESOURCE_EXHAUSTED" in tight.error
    [none] = fit.programs(cfg, mesh, ("sft",))
    fit.compile_program(none, limit=0)
    assert "already fills the chip" in none.error


def test_async_step_is_compiled_after_the_rollout_it_runs_beside():
    step = fit.Program("grpo step [1 x 2 x 3]", None, (), {}, alongside="rollout")
    rollout = fit.Program("rollout [1 x 2 + 3]", None, (), {})
    assert fit.compile_order([step, rollout]) == [rollout, step]
    rollout.memory, rollout.peak = fit.Memory(5, 0, 0, 0, 12), 12
    fit._add_alongside(step, [step, rollout])
    assert step.held == {"rollout running alongside (async): temporaries + outputs": 7}


def test_a_tpu_compile_gets_splash_attention_whatever_the_host(mesh):
    """The kernel follows the platform the program is compiled for: the SFT step lowered for the
    v5e chips on this CPU host calls the Pallas splash kernel (a Mosaic `tpu_custom_call`: forward,
    dQ and dK/dV), and with model.attention=xla it does not."""
    texts = {}
    for kind in ("auto", "xla"):
        cfg = load_config(None, SMALL + [f"model.attention={kind}"])
        [program] = fit.programs(cfg, mesh, ("sft",))
        texts[kind] = program.fn.lower(*program.args).as_text()
    assert texts["auto"].count("tpu_custom_call") >= 3
    assert "tpu_custom_call" not in texts["xla"]
    # and the TPU compiler takes it. Under remat the backward pass keeps the kernel's output
    # (kernels.REMAT_POLICY): the compiled step runs the same kernels as without remat, three a block,
    # not the forward a second time.
    calls = {}
    for remat in ("false", "true"):
        [program] = fit.programs(load_config(None, SMALL + [f"model.remat={remat}"]), mesh, ("sft",))
        assert not fit.compile_program(program).error, program.error
        calls[remat] = program.compiled.as_text().count("tpu_custom_call")
    assert calls == {"false": 3 * 2, "true": 3 * 2}  # the tiny model's 2 blocks


def test_slices_are_named_as_google_names_them():
    """v5p-N and v4-N count TensorCores (two per chip), v5e-N and v6e-N chips."""
    assert [fit.topology(n) for n in ("v5p-8", "v5p-16", "v5p-32", "v4-8", "v5e-4", "v6e-8")] == [
        "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v4:2x2x1", "v5e:2x2", "v6e:2x4"]
    assert [fit.slice_name(t) for t in ("v5p:2x2x1", "v5p:2x2x2", "v5e:2x2", "v5p-8")] == [
        "v5p-8", "v5p-16", "v5e-4", "v5p-8"]
    assert len(fit.topology_devices("v5p-8")) == 4
    with pytest.raises(ValueError, match="no v5p slice of that size; known: v5p-8, v5p-16"):
        fit.topology("v5p-12")
