"""Storage by path or URL (qedjax.storage) and the launcher's preflight: a store that cannot be written,
locally or in a bucket of the GCS emulator, and a judge that does not answer, each named before
anything compiles; and what the trainer publishes for its rollout workers (the run description, the
tokenizer, versions in the engine dtype)."""

import json
import os
import socket

import pytest
import yaml

from qedjax import pipeline, storage
from qedjax.config import load_config


def test_a_store_that_takes_no_write_is_named(tmp_path, gcs):
    storage.check_writable(tmp_path / "fine")
    bucket = gcs.bucket()
    storage.check_writable(f"{bucket}/run/weights")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(storage.StorageError, match=f"the queue {blocker}/q is not writable"):
        storage.check_writable(blocker / "q", "queue")
    missing = bucket.replace("gs://", "gs://no-such-") + "/run"
    with pytest.raises(storage.StorageError, match=f"{missing} is not writable"):
        storage.check_writable(missing)
    assert storage.join("gs://b/run/", "queue") == "gs://b/run/queue" and storage.parent("gs://b/run/w") == "gs://b/run"


def _config(tmp_path, **sections):
    raw = {"run": {"dir": str(tmp_path / "run"), "seed": 0, "stages": ["grpo"]}, "model": {"preset": "tiny"},
           "grpo": {"init": "model", "steps": 1, "problems_per_step": 2, "group_size": 2,
                    "sampling": {"max_new_tokens": 100, "temperature": 1.0}}, **sections}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


def test_preflight_names_the_judge_and_the_store_in_seconds(tmp_path):
    from qedjax.judge import JudgeUnreachableError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    cfg = _config(tmp_path, judge={"base_url": f"http://127.0.0.1:{port}/v1", "model": "j"})
    cfg = pipeline.dataclasses.replace(cfg, grpo=pipeline.dataclasses.replace(cfg.grpo, grader="judge"))
    with pytest.raises(JudgeUnreachableError, match=f"http://127.0.0.1:{port}/v1 does not answer"):
        pipeline.preflight(cfg, cfg.run.dir, ["grpo"])
    pipeline.preflight(cfg, cfg.run.dir, ["sft"])  # no stage that needs the judge: not asked
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = _config(tmp_path, engine={"kind": "workers", "store": str(tmp_path / "w"), "queue": str(blocker / "q")})
    with pytest.raises(storage.StorageError, match=r"work queue \(engine.queue\) .*a-file/q is not writable"):
        pipeline.preflight(cfg, cfg.run.dir, ["grpo"])


def test_the_trainer_describes_the_run_and_publishes_in_the_engine_dtype(tmp_path, toy_tokenizer, gcs):
    """A bf16 model trained in fp32 publishes bf16 versions (half the bytes); a worker finds the queue,
    the context length and the tokenizer in the store, nothing on its command line."""
    from flax import nnx

    from qedjax.models.qwen3 import Qwen3, Qwen3Config
    from qedjax.rollout import items
    from qedjax.rollout.weights import WeightStore

    bucket = gcs.bucket()
    cfg = _config(tmp_path, engine={"kind": "workers", "store": f"{bucket}/run/weights"},
                  model={"preset": "tiny", "param_dtype": "float32", "dtype": "bfloat16"})
    model = Qwen3(Qwen3Config.preset("tiny", param_dtype="float32", dtype="bfloat16"), rngs=nnx.Rngs(0))
    publisher = pipeline.engine_factory(cfg, toy_tokenizer, None, cfg.run.dir)(model, 0)
    store = WeightStore(f"{bucket}/run/weights")
    manifest = store.manifest(0)
    assert manifest["dtype"] == "bfloat16" and publisher.dtype == "bfloat16"
    fp32 = sum(x.nbytes for x in __import__("jax").tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    assert sum(a.nbytes for _, a in store.read(0)) * 2 == fp32  # half the bytes of the trainer's parameters
    run = items.read_run(f"{bucket}/run/weights")
    assert run["queue"] == f"{bucket}/run/rollout_queue" and run["format"] == items.FORMAT
    assert run["max_model_len"] == 5120  # 100 new tokens (no RC) + 4,096 prompt tokens, in units of 1,024
    got = items.fetch_tokenizer(f"{bucket}/run/weights", str(tmp_path / "tok"))
    assert json.loads(open(os.path.join(got, "tokenizer_config.json")).read())
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(got)
    chat = [{"role": "user", "content": "1 2 3"}]
    assert again.apply_chat_template(chat, tokenize=False) == toy_tokenizer.apply_chat_template(chat, tokenize=False)
    assert publisher.dispatch == {"problems_per_item": 2, "slots": 2, "dead_after_s": 300.0}
