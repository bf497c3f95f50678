"""The shipped 4B configs carry the released recipe's values. Each value's source is in its comment:
"paper" is the QED-Nano paper, "release" its released training code (the section of each that
states the value is named)."""

import math
import os
import re

import pytest

from qedjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(__file__))
GRPO_CONFIGS = ["qwen3-4b-grpo.yaml", "qwen3-4b-grpo-rc.yaml", "qwen3-4b-grpo-rc-vllm.yaml"]
RC_CONFIGS = ["qwen3-4b-grpo-rc.yaml", "qwen3-4b-grpo-rc-vllm.yaml"]


def _load(name):
    return load_config(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize("name", GRPO_CONFIGS)
def test_4b_grpo_configs_carry_the_release_values(name):
    g = _load(name).grpo
    assert g.group_size == 16  # "Stage 2/3": G = 16 rollouts per prompt (paper)
    assert g.problems_per_step == 64  # "Stage 2/3": batch 64 problems x 16 rollouts (release)
    assert g.optim.lr == 1e-6 and g.optim.schedule == "constant"  # "Stage 2/3": AdamW, lr 1e-6 constant
    assert g.optim.warmup_ratio == 0.0  # constant from the first step (release)
    assert g.loss.clip_low == 4.0 and g.loss.clip_high == 4.0  # "Stage 2/3": very wide clip, eps = 4
    assert g.loss.entropy_coef == 1e-4  # "Stage 2/3": entropy bonus 1e-4
    assert g.loss.kl_coef == 0.0  # "Stage 2/3": KL to a reference is off in the release (coef 0)
    assert g.loss.aggregation == "constant"  # "Stage 2/3": sum over tokens / sequences per step
    assert not g.loss.normalize_std  # "Stage 2/3": dividing by the group std is off in the release
    assert g.sampling.temperature == 0.8  # "Stage 2/3": training logits / sampling temperature 0.8
    assert g.sampling.top_p == 1.0 and g.sampling.top_k == 0  # untruncated sampling at T 0.8 (release)
    assert g.sampling.max_new_tokens == 49152  # "Stage 2/3": max response 49,152 tokens in RC
    assert g.max_lag == 5  # "Stage 2/3": at most max_lag = 5 optimizer steps behind (paper)
    assert g.mode == "async"  # "Stage 2/3": asynchronous rollouts (paper); it fits every target (docs/FIT.md)
    assert g.optim.clip_norm == 0.3  # "Stage 2/3": grad clip 0.3 (release)
    assert g.optim.weight_decay == 0.01  # "Stage 2/3": weight decay 0.01 (release)
    assert g.answer_timeout_s == 1.0  # the release's answer check runs math-verify with a 1 s timeout


@pytest.mark.parametrize("name", RC_CONFIGS)
def test_4b_rc_configs_carry_the_release_values(name):
    rc = _load(name).grpo.rc
    assert rc.enabled
    assert rc.turns == 3  # "Reasoning cache": 3 reasoning turns give 4 states (release)
    assert rc.states_per_problem == 2  # "Reasoning cache": 2 states sampled per problem (release)
    assert rc.mode == "replace"  # "Reasoning cache": the new summary replaces the old one
    assert rc.summary_max_new_tokens == 2048  # the release's summary call: at most 2,048 tokens
    # The release's summary sampling: T 0.7, top-p 0.8, top-k 20 (its summariser's own settings).
    assert (rc.summary_temperature, rc.summary_top_p, rc.summary_top_k) == (0.7, 0.8, 20)


def test_4b_rc_config_summarises_with_the_frozen_instruct_model():
    # "Reasoning cache": in training a frozen instruct model summarises (Qwen3-4B-Instruct-2507 in
    # the release); with rollout workers (the -vllm config) each worker runs it as a second engine.
    assert _load("qwen3-4b-grpo-rc.yaml").grpo.rc.summarizer.endswith("checkpoints/Qwen3-4B-Instruct-2507")
    assert _load("qwen3-4b-grpo-rc-vllm.yaml").grpo.rc.summarizer.endswith("checkpoints/Qwen3-4B-Instruct-2507")


def test_4b_sft_config_carries_the_paper_values():
    s = _load("qwen3-4b-sft.yaml").sft
    assert s.epochs == 5  # "Stage 1": 5 epochs (paper)
    assert s.global_batch == 32  # "Stage 1": global batch 32 (paper)
    assert s.optim.schedule == "cosine"  # "Stage 1": cosine schedule (paper)
    assert s.optim.warmup_ratio == 0.1  # "Stage 1": 10% warmup (paper)


def test_training_temperature_must_be_positive_and_the_answer_timeout_is_configurable(tmp_path):
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    with pytest.raises(ValueError, match=r"grpo.sampling.temperature must be > 0, got 0.0"):
        load_config(tiny, ["grpo.sampling.temperature=0.0"])
    cfg = load_config(tiny, ["grpo.grader=answer"])
    assert cfg.grpo.answer_timeout_s == 1.0  # the release's default
    from qedjax import pipeline

    grader = pipeline.build_grader("answer", cfg, str(tmp_path), answer_timeout_s=cfg.grpo.answer_timeout_s)
    assert grader.timeout_s == 1.0
    cfg = load_config(tiny, ["grpo.answer_timeout_s=2.5"])
    assert pipeline.build_grader("answer", cfg, str(tmp_path), answer_timeout_s=cfg.grpo.answer_timeout_s
                                 ).timeout_s == 2.5
    with pytest.raises(ValueError, match="grpo.answer_timeout_s must be > 0"):
        load_config(tiny, ["grpo.answer_timeout_s=0"])


@pytest.mark.parametrize("name", ["qwen3-4b-sft.yaml", *GRPO_CONFIGS])
def test_4b_configs_name_their_slice_and_fill_its_chips(name):
    """Each 4B config names its slice as Google does (v5p-N counts TensorCores: a v5p-8 is 4 chips,
    2x2x1) and a mesh of that many chips, runs with that mesh, passes the launcher's checks on it,
    and puts one row on each chip per micro-batch (and one decoded row per chip in-process)."""
    import jax

    from qedjax import fit, launch, rl
    from qedjax.sharding import TRAIN_RULES, make_mesh, parse_mesh_spec

    text = open(os.path.join(ROOT, "configs", name)).read()
    found = re.search(r"# Target: a (v5p-\d+) slice \((\d+) chips, topology (\d+x\d+x\d+)\), mesh (\S+?)[,;]", text)
    assert found, f"{name} names no target slice"
    slice_name, chips, shape, spec = found.groups()
    chips = int(chips)
    assert fit.topology(slice_name) == f"v5p:{shape}" and math.prod(map(int, shape.split("x"))) == chips
    assert math.prod(parse_mesh_spec(spec).values()) == chips
    assert f"--mesh {spec}" in text  # the run command in the comments uses it
    cfg = _load(name)
    mesh = make_mesh(spec, devices=jax.devices()[:chips])
    stages = cfg.run.stages
    launch.validate(cfg, mesh, stages, check_paths=False)
    if cfg.sft is not None:
        assert cfg.sft.global_batch // cfg.sft.micro_batches == chips
    if cfg.grpo is not None:
        assert rl.train_rows(cfg.grpo, mesh, TRAIN_RULES) // cfg.grpo.micro_batches == chips
        assert rl.train_rows(cfg.grpo, mesh, TRAIN_RULES) == cfg.grpo.sequences_per_step  # no padding rows
        if cfg.engine.kind == "jax":
            assert cfg.engine.max_batch == chips
