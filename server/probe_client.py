"""Forwarding probe requests to a `gluscope probe` process (gluscope serve --probe URL).

The browser talks to the web server only; the server hands a probe request to
the probe as JSON and its answer back, errors included (they have the one
error shape). Before the first request for a model, and again after any
failure, the server asks the probe which models it holds and checks that it
holds this one: the same id with the same weights and tokenizer fingerprints
as the file. Standard-library HTTP in a thread keeps the server's
dependencies as they are.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

from gluscope.probe_protocol import START_HINT, TIMEOUT_S
from gluscope.server.db import Database
from gluscope.server.errors import ParameterError

HELD_TTL_S = 30.0  # how long the list of held models is trusted while requests succeed
ANSWER_MARGIN_S = 5.0  # beyond the probe's own per-request limit, for the transfer both ways


class ProbeUnavailable(ParameterError):
    """503: no probe is configured, it does not answer, or it does not hold this model."""

    def __init__(self, message: str, retry_after: str | None = None) -> None:
        super().__init__(503, None, message)
        self.retry_after = retry_after

    def __reduce__(self):
        return type(self), (self.message, self.retry_after)


class ProbeClient:
    def __init__(self, url: str | None, timeout_s: float = TIMEOUT_S + ANSWER_MARGIN_S) -> None:
        self.url = url.rstrip("/") if url else None
        self.timeout_s = timeout_s
        self._held: dict[str, dict[str, Any]] | None = None
        self._held_at = 0.0

    @property
    def configured(self) -> bool:
        return self.url is not None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], str | None]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return r.status, json.loads(r.read()), None
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read())
            except ValueError:
                payload = {}
            return e.code, payload, e.headers.get("Retry-After")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ProbeUnavailable(f"the probe at {self.url} is not answering ({reason}); {START_HINT}") from None

    async def held(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """The probe's models by id (GET /models), cached for HELD_TTL_S."""
        if refresh or self._held is None or time.monotonic() - self._held_at > HELD_TTL_S:
            status, body, _ = await asyncio.to_thread(self._call, "GET", "/models")
            if status != 200 or not isinstance(body.get("models"), list):
                raise ProbeUnavailable(f"{self.url} answered {status} to GET /models: is it a gluscope probe?")
            self._held = {m["model"]: m for m in body["models"] if isinstance(m, dict) and "model" in m}
            self._held_at = time.monotonic()
            limit = (body.get("limits") or {}).get("timeout_s")
            if isinstance(limit, (int, float)) and limit > 0:  # wait as long as the probe itself may take
                self.timeout_s = float(limit) + ANSWER_MARGIN_S
        return self._held

    async def check_holds(self, db: Database) -> None:
        if self.url is None:
            raise ProbeUnavailable(f"this server has no probe; {START_HINT}")
        held = (await self.held()).get(db.id)
        if held is None or held.get("weights_fingerprint") != db.meta["weights_fingerprint"]:
            held = (await self.held(refresh=True)).get(db.id)
        if held is None:
            raise ProbeUnavailable(f"the probe at {self.url} does not hold model {db.id} (it holds "
                                   f"{', '.join(sorted(self._held or {})) or 'none'}); start it on {db.path.name}")
        for key in ("weights_fingerprint", "tokenizer_fingerprint"):
            if held.get(key) != db.meta[key]:
                raise ProbeUnavailable(f"the probe at {self.url} holds another model under the id {db.id} (its "
                                       f"{key.split('_')[0]} fingerprint differs from {db.path.name}'s)")

    async def answer(self, db: Database, answer: str, request: dict[str, Any]) -> dict[str, Any]:
        """The probe's body for `answer` on `request`; its error, with its status, as a ParameterError."""
        await self.check_holds(db)
        status, body, retry_after = await asyncio.to_thread(self._call, "POST", f"/models/{db.id}/{answer}", request)
        if status == 200:
            return body
        self._held = None  # after a failure, ask again which models it holds
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            raise ProbeUnavailable(f"the probe at {self.url} answered {status} without an error body")
        if status == 503:
            raise ProbeUnavailable(str(error.get("message")), retry_after)
        raise ParameterError(int(error.get("status", status)), error.get("parameter"), str(error.get("message")),
                             error.get("valid"))
