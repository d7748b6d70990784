"""The HTTP layer: Label Studio's ML backend routes (the JSON of label-studio-ml-backend's
``label_studio_ml/api.py``) on Starlette.

- ``GET /health`` (and ``/``): ``{"status": "UP", "model_class", "model_version", ...}``
- ``POST /setup`` ``{"project", "schema", ...}``: the labeling config checked -> ``{"model_version"}``
- ``POST /predict`` ``{"tasks", "label_config", "project", "params"}`` -> ``{"results": [one per task]}``
- ``GET /versions`` -> ``{"versions": [model_version]}``; ``POST /webhook``: accepted and ignored
  (Label Studio registers it for training events; dapseg does not train).

Request bodies are read up to ``max_body_bytes`` (413 beyond). Errors are ``{"error": message}``. The
optional HTTP Basic auth (``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``, as the official backends) is the
one Label Studio sends when the ML backend is added with "basic auth".
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dapseg.serve.label_config import LabelConfigError
from dapseg.serve.service import BackendService, Busy


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, at most ``limit`` bytes (checked while reading, not only declared)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared):,} bytes, more than the server's limit of "
                                f"{limit:,} (--max-body-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body is more than the server's limit of {limit:,} bytes "
                                    "(--max-body-mb)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return data


def _basic_auth_ok(request: Request, credentials: tuple[str, str] | None) -> bool:
    if credentials is None:
        return True
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, credentials[0]) & hmac.compare_digest(password, credentials[1])


def create_app(service: BackendService, info: dict[str, Any] | None = None,
               basic_auth: tuple[str, str] | None = None) -> Starlette:
    """The ASGI app around ``service``; ``info`` is added to /health (preset, device)."""
    limit = service.limits.max_body_bytes

    def guarded(handler):
        async def endpoint(request: Request) -> JSONResponse:
            if not _basic_auth_ok(request, basic_auth):
                return JSONResponse({"error": "unauthorized"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="dapseg"'})
            try:
                return JSONResponse(await handler(request))
            except RequestError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except LabelConfigError as e:
                return JSONResponse({"error": str(e)}, status_code=422)
            except Busy as e:
                return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "10"})
        return endpoint

    async def health(request: Request) -> dict[str, Any]:
        return {"status": "UP", "model_class": "dapseg", "model_version": service.model_version, **(info or {})}

    async def setup(request: Request) -> dict[str, Any]:
        data = await read_json(request, limit)
        schema = data.get("schema")
        if not isinstance(schema, str):
            raise RequestError(400, "setup: \"schema\" (the labeling config) is missing")
        service.targets(schema)  # a config dapseg cannot use fails here: Label Studio shows the backend in error
        return {"model_version": service.model_version}

    async def predict(request: Request) -> dict[str, Any]:
        data = await read_json(request, limit)
        tasks, config = data.get("tasks"), data.get("label_config")
        if not isinstance(tasks, list):
            raise RequestError(400, "predict: \"tasks\" must be a list")
        if not isinstance(config, str):
            raise RequestError(400, "predict: \"label_config\" must be the labeling config (XML text)")
        return {"results": await service.predict(tasks, config)}

    async def versions(request: Request) -> dict[str, Any]:
        return {"versions": [service.model_version]}

    async def webhook(request: Request) -> dict[str, Any]:
        await read_json(request, limit)
        return {"status": "ignored: dapseg serve does not train"}

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await service.close()

    return Starlette(
        routes=[
            Route("/", guarded(health), methods=["GET"]),
            Route("/health", guarded(health), methods=["GET"]),
            Route("/setup", guarded(setup), methods=["POST"]),
            Route("/predict", guarded(predict), methods=["POST"]),
            Route("/versions", guarded(versions), methods=["GET"]),
            Route("/webhook", guarded(webhook), methods=["POST"]),
        ],
        lifespan=lifespan,
    )
