"""Talking to a judge model behind an OpenAI-compatible HTTP API (vLLM serve, SGLang, hosted APIs).

`complete_all(config, prompts)` sends one user message per prompt and returns the judge's text for
each, or why there is none. It is synchronous and callable from any thread, with or without an
event loop: `concurrency` threads each hold one keep-alive connection, because judging is I/O bound
(1,000 calls of 50 ms at concurrency 64 take about a second, not 50 s).

`timeout_s` bounds every wait inside a call (connecting, sending, each read), which for a
non-streaming judge is the wait for its reply. A call is retried up to `max_retries` times after
connection errors, timeouts, malformed replies, 429 and 5xx, waiting `backoff_s * 2**attempt`
with jitter in between, or what the server's Retry-After header asks for (seconds or an HTTP
date), never longer than `max_wait_s`. Other 4xx answers are
not retried: the same request would fail again. A failed call costs its own item, never the batch.

With `cache_dir` set, each successful reply is stored under the hash of what determines it (API
style, model, sampling settings, prompt), so re-running an evaluation costs no calls. The API key is
read from the environment variable named in the config at call time and only ever put in the
Authorization header: it is not kept on any object, logged, or written to the cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Sequence

import httpx

logger = logging.getLogger(__name__)

# Statuses worth another try: overload, rate limits and server-side failures.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_WAIT_S = 120.0  # default cap on a single backoff or Retry-After wait (JudgeConfig.max_wait_s)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Where the judge lives and how to call it; the `judge` section of a YAML config maps onto it."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "openai/gpt-oss-20b"
    api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key, never the key
    api: str = "chat"  # "chat" (/chat/completions) | "responses" (/responses)
    style: str = "rubric"  # "rubric" | "proofbench": which prompt the grader renders
    concurrency: int = 64
    timeout_s: float = 600.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_wait_s: float = MAX_WAIT_S  # cap on one wait between tries, whatever Retry-After asks (1e9 s, a far date)
    temperature: float = 1.0
    max_tokens: int | None = None
    reasoning_effort: str | None = "medium"
    cache_dir: str | None = None

    def __post_init__(self):
        if self.api not in ("chat", "responses"):
            raise ValueError(f"judge api must be 'chat' or 'responses', got {self.api!r}")
        if self.style not in ("rubric", "proofbench"):
            raise ValueError(f"judge style must be 'rubric' or 'proofbench', got {self.style!r}")
        if (self.concurrency < 1 or self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0
                or self.max_wait_s < 0):
            raise ValueError(
                "judge needs concurrency >= 1, timeout_s > 0, max_retries >= 0, backoff_s >= 0 and max_wait_s >= 0"
            )


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str | None  # the judge's text; None when the call failed
    error: str = ""  # "judge_error" | "timeout" when text is None
    detail: str = ""  # why the last attempt failed, for inspection
    cached: bool = False


def complete_all(config: JudgeConfig, prompts: Sequence[str]) -> list[Reply]:
    """Sends every prompt to the judge and waits for all replies.

    Callable from any thread, with or without a running event loop.

    Args:
        config: endpoint, model, sampling, concurrency, timeouts, retries and cache.
        prompts: one user message each.

    Returns:
        One Reply per prompt, in order. Never raises for a failed call.
    """
    if not prompts:
        return []
    headers = {}
    api_key = os.environ.get(config.api_key_env)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # One thread and one single-connection client per concurrency slot. A shared client is the
    # obvious design, but httpx's connection pool spends CPU in proportion to its size on every
    # request (and its asyncio flavour more still), which made 1,000 calls cost 4-13 s of client
    # time instead of the 0.8 s the server needs.
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()
    rng = random.Random()
    # Loading the CA bundle takes ~45 ms; done once here rather than once per client.
    ssl_context = httpx.create_ssl_context()

    def call(prompt: str) -> Reply:
        if not hasattr(local, "client"):
            local.client = httpx.Client(headers=headers, timeout=config.timeout_s, verify=ssl_context)
            with lock:
                clients.append(local.client)
        return _complete_one(local.client, rng, config, prompt)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(config.concurrency, len(prompts))) as pool:
            return list(pool.map(call, prompts))
    finally:
        for client in clients:
            client.close()


class JudgeUnreachableError(RuntimeError):
    """The judge endpoint does not answer, refuses the key, or does not serve the model (preflight)."""


def probe(config: JudgeConfig, timeout_s: float = 10.0) -> list[str]:
    """Asks the judge endpoint which models it serves (GET {base_url}/models, what OpenAI-compatible
    servers answer), before a run spends a step of rollouts on it; returns the model ids.

    Raises JudgeUnreachableError naming the URL when nothing answers within `timeout_s`, the server
    refuses the key or has no such endpoint (a base_url without its /v1), or it lists models and
    `config.model` is not among them.
    """
    url = config.base_url.rstrip("/") + "/models"
    api_key = os.environ.get(config.api_key_env)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise JudgeUnreachableError(f"the judge at {config.base_url} does not answer ({type(exc).__name__}: {exc}); "
                                    f"start it or fix judge.base_url") from None
    if response.status_code in (401, 403):
        raise JudgeUnreachableError(f"the judge at {config.base_url} refuses the key in ${config.api_key_env} "
                                    f"(HTTP {response.status_code})")
    if response.status_code != 200:
        raise JudgeUnreachableError(f"the judge at {config.base_url} answers GET {url} with HTTP {response.status_code} "
                                    f"(an OpenAI-compatible base_url ends in /v1)")
    try:
        served = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise JudgeUnreachableError(f"the judge at {config.base_url}: {url} is not an OpenAI model list: "
                                    f"{response.text[:200]}") from None
    if served and config.model not in served:
        raise JudgeUnreachableError(f"the judge at {config.base_url} serves {served[:8]}, not judge.model="
                                    f"{config.model!r}")
    return served


def _complete_one(client: httpx.Client, rng: random.Random, config: JudgeConfig, prompt: str) -> Reply:
    key = cache_key(config, prompt)
    if config.cache_dir:
        text = _cache_get(config.cache_dir, key)
        if text is not None:
            return Reply(text, cached=True)
    path = "/responses" if config.api == "responses" else "/chat/completions"
    url = config.base_url.rstrip("/") + path
    body = request_body(config, prompt)
    error, detail = "judge_error", ""
    for attempt in range(config.max_retries + 1):
        wait = None
        try:
            response = client.post(url, json=body)
        except httpx.TimeoutException:
            error, detail = "timeout", f"no reply within {config.timeout_s} s"
        except httpx.HTTPError as exc:  # refused, reset or dropped connections
            error, detail = "judge_error", f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                try:
                    text = reply_text(config.api, response.json())
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    error, detail = "judge_error", f"malformed reply ({exc}): {response.text[:200]}"
                else:
                    if config.cache_dir:
                        _cache_put(config.cache_dir, key, text)
                    return Reply(text)
            else:
                error, detail = "judge_error", f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRYABLE_STATUS:
                    break
                wait = retry_after_s(response.headers.get("retry-after"))
        logger.debug("judge call attempt %d failed: %s", attempt + 1, detail)
        if attempt < config.max_retries:
            if wait is None:
                wait = config.backoff_s * 2**attempt * rng.uniform(0.5, 1.5)
            time.sleep(min(wait, config.max_wait_s))
    return Reply(None, error, detail)


def request_body(config: JudgeConfig, prompt: str) -> dict:
    """The JSON body of one judge request (chat completions or Responses API)."""
    body: dict = {"model": config.model, "temperature": config.temperature}
    if config.api == "responses":
        body["input"] = prompt
        if config.max_tokens is not None:
            body["max_output_tokens"] = config.max_tokens
        if config.reasoning_effort is not None:
            body["reasoning"] = {"effort": config.reasoning_effort}
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
        if config.max_tokens is not None:
            body["max_completion_tokens"] = config.max_tokens
        if config.reasoning_effort is not None:
            body["reasoning_effort"] = config.reasoning_effort
    return body


def reply_text(api: str, data: dict) -> str:
    """The judge's final text from a decoded reply ("" when the model produced none).

    Raises:
        KeyError, IndexError, TypeError: the reply does not have the API's shape.
    """
    if api == "responses":
        if isinstance(data.get("output_text"), str):
            return data["output_text"]
        parts = [
            part["text"]
            for item in data["output"]
            if item.get("type") == "message"
            for part in item.get("content") or []
            if part.get("type") == "output_text"
        ]
        return "".join(parts)
    # Reasoning servers put the thinking in a separate field; content is the verdict (or null
    # when the token budget ran out first).
    return data["choices"][0]["message"]["content"] or ""


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def cache_key(config: JudgeConfig, prompt: str) -> str:
    """Hash of everything that determines a judge reply (not the endpoint, never the key)."""
    material = {
        "api": config.api,
        "model": config.model,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "reasoning_effort": config.reasoning_effort,
        "prompt": prompt,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key[:2], key + ".txt")


def _cache_get(cache_dir: str, key: str) -> str | None:
    try:
        with open(_cache_path(cache_dir, key), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _cache_put(cache_dir: str, key: str, text: str) -> None:
    path = _cache_path(cache_dir, key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Write then rename, so a concurrent reader or a killed run never sees half a reply.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only disk loses the cache entry, not the grade
        logger.warning("could not write judge cache entry %s: %s", path, exc)
