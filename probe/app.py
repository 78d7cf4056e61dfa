"""The probe's HTTP face: what it holds (GET /models) and the three answers (POST /models/{model}/{answer}).

Only the web server is meant to call it (server/probe_client.py); errors have
the server's one shape, so the server hands them on as they are.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

import gluscope
from gluscope.probe.answers import PLANS, Limits
from gluscope.probe.batcher import Batcher, QueueFull
from gluscope.probe.forward import Passes
from gluscope.probe.loaded import LoadedModel
from gluscope.probe_protocol import ANSWERS, REQUESTS, ProbeStatus
from gluscope.server.errors import ParameterError, not_one_of


def create_probe_app(models: dict[str, LoadedModel], limits: Limits, batcher: Batcher) -> FastAPI:
    passes = {model_id: Passes(lm) for model_id, lm in models.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="GLUScope probe", version=gluscope.__version__, lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/models", response_model=ProbeStatus)
    def held() -> dict[str, Any]:
        return {"models": [{"model": model_id, "weights_fingerprint": lm.db.meta["weights_fingerprint"],
                            "tokenizer_fingerprint": lm.db.meta["tokenizer_fingerprint"],
                            "device": str(lm.model.device), "dtype": str(lm.db.meta["dtype"])}
                           for model_id, lm in models.items()],
                "limits": {"max_tokens": limits.max_tokens, "max_neurons": limits.max_neurons,
                           "queue_size": batcher.queue_size, "timeout_s": batcher.timeout_s,
                           "batch_tokens": batcher.batch_tokens}}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        s = batcher.stats
        return {"passes": s.passes, "requests": s.requests, "batched": s.batched,
                "pass_sizes": {str(k): v for k, v in sorted(s.sizes.items())}}

    def route(answer: str):
        request_model = REQUESTS[answer]
        plan_of = PLANS[answer]

        async def run(model: str, body: request_model) -> Any:  # type: ignore[valid-type]
            if model not in models:
                raise not_one_of("model", model, sorted(models), status=404)
            plan = plan_of(models[model], body, limits)
            return await batcher.answer(passes[model], plan)
        run.__name__ = answer
        run.__annotations__.update(model=str, body=request_model)  # real classes: this module's are strings
        app.add_api_route(f"/models/{{model}}/{answer}", run, methods=["POST"])

    for answer in ANSWERS:
        route(answer)

    async def parameter_error(request: Request, exc: ParameterError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "path", "query")]
        name = loc[0] if loc else None
        message = f"{name} is required" if first.get("type") == "missing" else f"{name}: {first.get('msg', 'invalid')}"
        return JSONResponse(ParameterError(422, name, message).body(), status_code=422)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ParameterError(exc.status_code, None, str(exc.detail)).body(),
                            status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ParameterError, parameter_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    return app
