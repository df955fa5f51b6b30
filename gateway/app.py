"""The gateway's ASGI app: ``create_app(settings)``, nothing done at import.

Connections open in the app's lifespan (when a server starts it), so building the app
(tests, the OpenAPI document) needs no Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from imageq.api_client.settings import Settings
from imageq.gateway import errors, files, jobs, openai_images, usage
from imageq.gateway.guard import Guard
from imageq.gateway.metrics import GatewayMetrics
from imageq.gateway.models import SUBMIT_MODELS
from imageq.gateway.openai_compat import parse_models
from imageq.gateway.state import Gateway

DESCRIPTION = """\
Jobs over HTTP for backends that do not hold the Redis password. Every request carries
`Authorization: Bearer TOKEN` (a tenant's token, `imageq tokens create`); a tenant sees
and cancels only its own jobs. The job record is the one `Client.get` returns
(docs/design.md §4). Errors are always `{"error": {"code", "message", "field"?}}`, except
on the OpenAI-compatible routes (`/v1/images/*`, `/v1/models`), which answer in OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` for the `openai` client.
"""


def _version() -> str:
    try:
        return metadata.version("imageq")
    except metadata.PackageNotFoundError:
        return "0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings.from_env()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(settings, metrics)
        await run_in_threadpool(gateway.warm)
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="imageq gateway",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.metrics = metrics
    app.state.openai_models = parse_models(settings.gateway_openai_models)
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(usage.router)
    app.include_router(openai_images.router)
    app.add_middleware(Guard, settings=settings, metrics=metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # The per-kind submit bodies are named by $ref in the submit route; their
            # schemas (and the input models they use) join the components here.
            _, defs = models_json_schema(
                [(m, "validation") for m in SUBMIT_MODELS],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            schema["components"]["securitySchemes"] = jobs.SECURITY_SCHEMES
            _one_error_format(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _one_error_format(schema: dict[str, Any]) -> None:
    """FastAPI documents its own 422 shape on every route with parameters; the gateway
    answers every error, 422 included, in the one error format."""
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422")
            if answer is None:
                continue
            for content in answer.get("content", {}).values():
                content["schema"] = error_ref
            if answer.get("description") == "Validation Error":
                answer["description"] = "invalid input; error.field names it"
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
