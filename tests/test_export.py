"""Export: a checkpoint trained on a sharded mesh -> a HF directory transformers loads with the same
logits; bf16 keeps its dtype; tokenizer and chat template travel along; clear errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
import yaml
from flax import nnx

from hf_utils import hf_logits
from qedjax import export, sharding, sft, toy, train
from qedjax.checkpoint import restore_params
from qedjax.config import load_config
from qedjax.metrics import MetricsWriter
from qedjax.safetensors_io import SafetensorsFile, read_index

TRAIN_MESH = "fsdp=4,tensor=2"


def _config(tmp_path, tokenizer_dir):
    data = toy.write_data(toy.ToyConfig(sft_rows=64, rl_problems=1, eval_problems=1), str(tmp_path / "data"))
    raw = {"run": {"dir": str(tmp_path / "run"), "seed": 3, "mesh": TRAIN_MESH},
           "model": {"preset": "tiny", "tokenizer": tokenizer_dir},
           "sft": {"global_batch": 8, "steps": 3, "data": {"path": data["sft"], "seq_len": 96},
                   "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
                   "checkpoint": {"every": 3, "keep": 1, "async_save": False}}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(raw))
    return load_config(str(tmp_path / "sft.yaml"))


def _with_export(cfg, **options):
    """cfg with an export section (a stand-in subclass until Config has the field itself)."""
    ecfg = export.ExportConfig(**options)
    if "export" in {f.name for f in dataclasses.fields(cfg)}:
        return dataclasses.replace(cfg, export=ecfg)
    cls = dataclasses.make_dataclass("WithExport", [("export", export.ExportConfig, dataclasses.field(default=None))],
                                     bases=(type(cfg),), frozen=True)
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, export=ecfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_tokenizer_dir):
    """A run dir whose SFT checkpoints were written from params sharded over fsdp=4,tensor=2."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = _config(tmp, toy_tokenizer_dir)
    mesh = sharding.make_mesh(cfg.run.mesh)
    sft.run(cfg, mesh, cfg.run.dir, MetricsWriter(cfg.run.dir, tensorboard=False),
            tokenizer_path=cfg.model.tokenizer)
    _, graphdef, target = train.abstract_params(cfg.model, mesh, sharding.TRAIN_RULES)
    params = jax.device_get(restore_params(os.path.join(cfg.run.dir, "sft", "checkpoints"), target))
    return cfg, graphdef, params


def test_fp32_export_matches_qedjax_logits_and_carries_the_tokenizer(trained, toy_tokenizer_dir):
    cfg, graphdef, params = trained
    mesh = sharding.make_mesh(TRAIN_MESH)
    out = export.run(cfg, mesh, cfg.run.dir, tokenizer_path=cfg.model.tokenizer)
    assert out == os.path.join(cfg.run.dir, "hf")
    marker = json.loads(open(os.path.join(out, export.MARKER)).read())
    assert marker["step"] == 3 and marker["checkpoint"].endswith("sft/checkpoints")

    tokens = np.random.RandomState(0).randint(0, 512, (2, 10))
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens, jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(hf, tokens), ours, atol=1e-4, rtol=0)

    tok, ref = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(
        toy_tokenizer_dir)
    assert tok.chat_template == ref.chat_template == toy.CHAT_TEMPLATE
    chat = [{"role": "user", "content": toy.problem_text([1, 2, 3, 4, 5, 6, 7])}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True)
    gen = json.loads(open(os.path.join(out, "generation_config.json")).read())
    assert gen["eos_token_id"] == ref.eos_token_id  # filled from the tokenizer: the preset has none

    # A second run with the same source skips itself and leaves the files alone.
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert export.run(cfg, mesh, cfg.run.dir, tokenizer_path=cfg.model.tokenizer) == out
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp


def test_bf16_export_keeps_dtypes_in_sharded_files(trained, tmp_path):
    cfg, _, params = trained
    cfg = _with_export(cfg, dtype="bfloat16", max_shard_bytes=60_000)
    step_dir = os.path.join(cfg.run.dir, "sft", "checkpoints", "3")  # one step's directory works too
    out = export.run(cfg, sharding.make_mesh("data=2,fsdp=2,tensor=2"), cfg.run.dir, checkpoint=step_dir,
                     out=str(tmp_path / "bf16"), tokenizer_path=cfg.model.tokenizer)
    files = read_index(out)
    assert len(set(files.values())) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    codes = {SafetensorsFile(f).dtype_code(n) for n, f in files.items()}
    assert codes == {"BF16"}
    hf_cfg = json.loads(open(os.path.join(out, "config.json")).read())
    # written by transformers' own Qwen3Config.save_pretrained, not by hand
    assert hf_cfg["dtype"] == "bfloat16" and hf_cfg["transformers_version"] == transformers.__version__
    up = np.array(SafetensorsFile(files["model.layers.1.mlp.up_proj.weight"]).get("model.layers.1.mlp.up_proj.weight"))
    np.testing.assert_array_equal(up, params["layers"][1]["mlp"]["up_proj"].astype(up.dtype))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {str(p.dtype) for p in hf.parameters()} == {"torch.bfloat16"}


def test_missing_or_mismatched_checkpoints_are_clear_errors(trained, tmp_path):
    cfg, _, _ = trained
    mesh = sharding.make_mesh(TRAIN_MESH)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        export.run(cfg, mesh, cfg.run.dir, checkpoint=str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "nowhere")  # looking must not create it
    with pytest.raises(FileNotFoundError, match=r"empty/sft/checkpoints"):
        export.run(cfg, mesh, str(tmp_path / "empty"))
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, preset="bench-100m"))
    with pytest.raises(ValueError, match="does not hold the model of the config.*bench-100m"):
        export.run(other, mesh, cfg.run.dir, out=str(tmp_path / "other"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="full"):
        export.run(cfg, mesh, cfg.run.dir, out=str(tmp_path / "full"))


def test_export_reads_and_writes_gs_urls(trained, tmp_path, gcs):
    """A checkpoint in a bucket exported to a bucket (the GCS emulator): the same files as a local export."""
    import gcsfs

    cfg, _, _ = trained
    bucket = gcs.bucket()
    fs = gcsfs.GCSFileSystem()
    fs.put(os.path.join(cfg.run.dir, "sft", "checkpoints"), f"{bucket}/run/sft/", recursive=True)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    local = export.run(cfg, mesh, cfg.run.dir, out=str(tmp_path / "local"), tokenizer_path=cfg.model.tokenizer)
    remote = export.run(cfg, mesh, cfg.run.dir, checkpoint=f"{bucket}/run/sft/checkpoints", out=f"{bucket}/hf",
                        tokenizer_path=cfg.model.tokenizer)
    assert remote == f"{bucket}/hf"
    fs.get(f"{bucket}/hf/", str(tmp_path / "back"), recursive=True)
    names = sorted(os.listdir(local))
    assert sorted(os.listdir(tmp_path / "back")) == names and "config.json" in names
    for name in names:
        if name != export.MARKER:  # the marker names the checkpoint it came from
            assert (tmp_path / "back" / name).read_bytes() == open(os.path.join(local, name), "rb").read(), name
    marker = json.loads((tmp_path / "back" / export.MARKER).read_text())
    assert marker["checkpoint"] == f"{bucket}/run/sft/checkpoints" and marker["step"] == 3
    # A second export of the same step finds the marker in the bucket and skips.
    assert export.run(cfg, mesh, cfg.run.dir, checkpoint=f"{bucket}/run/sft/checkpoints", out=f"{bucket}/hf",
                      tokenizer_path=cfg.model.tokenizer) == f"{bucket}/hf"
