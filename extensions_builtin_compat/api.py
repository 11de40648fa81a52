"""HTTP API (webui started with --api): POST /dreamartist/v1/train and GET /dreamartist/v1/pairs.

The train call blocks until training ends, like /sdapi/v1/train/embedding, holding the webui's GPU queue
lock. Bodies are plain JSON dicts validated by TrainConfig.from_dict, so the module works with the
pydantic 1 / fastapi 0.94 of A1111 and the pydantic 2 / fastapi 0.104 of Forge alike. Every problem is an
HTTP error whose JSON "detail" is one sentence (the webui's API error handlers, which serve every route of the
app, add "error", "body" and "errors" beside it): 4xx for a bad request, 5xx for a failure; never a 200.
"""
from __future__ import annotations

import base64
import binascii
import logging
import secrets
from typing import Any

from fastapi import Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from modules import call_queue, shared

from dreamartist.config import TrainConfig
from dreamartist.errors import DreamArtistError, InputError, ModelError
from dreamartist.images import load_image, prepare_reference
from dreamartist.names import negative_name

from . import embeddings, host, jobs

PREFIX = "/dreamartist/v1"
log = logging.getLogger("dreamartist")


def decode_image(data: Any, what: str):
    """A base64 image (a data-URL prefix is tolerated) -> RGB PIL image; InputError when it is not one."""
    if not isinstance(data, str) or not data.strip():
        raise InputError(f"'{what}' must be a base64-encoded image.")
    payload = data.partition(",")[2] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"'{what}' is not valid base64.") from None
    return load_image(raw)


def _clash(config: TrainConfig) -> str | None:
    """The existing name that a new pair would silently replace, if any."""
    if config.overwrite or config.resume:
        return None
    taken = {name.lower() for name in embeddings.existing_names()}
    for name in (config.name, negative_name(config.name)):
        if name.lower() in taken:
            return name
    return None


def train(body: Any = Body(...)) -> dict:
    """Train a pair from one reference image; returns the files written and the final loss."""
    if not isinstance(body, dict):
        raise HTTPException(status_code=422, detail="The body must be a JSON object.")
    fields = dict(body)
    try:
        image = decode_image(fields.pop("image", None), "image")
        mask_data = fields.pop("mask", None)
        mask = decode_image(mask_data, "mask") if mask_data is not None else None
        config = TrainConfig.from_dict(fields)
        references = [prepare_reference(image, config.width, config.height, mask=mask)]
    except InputError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    unavailable = host.host_unsupported_reason()
    if unavailable:
        raise HTTPException(status_code=501, detail=unavailable)
    clash = _clash(config)
    if clash:
        raise HTTPException(status_code=409, detail=f"An embedding named {clash!r} already exists; choose another "
                                                    "name, or set overwrite (replace it) or resume (continue it).")
    try:
        with call_queue.queue_lock:
            result = jobs.run_training(config, references)
    except InputError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    except ModelError as e:  # the loaded model cannot be trained on (none, SDXL, lowvram): not the request's fault
        raise HTTPException(status_code=503, detail=str(e)) from None
    except DreamArtistError as e:  # TrainingStopped: non-finite loss, out of memory; the message says what was kept
        raise HTTPException(status_code=500, detail=str(e)) from None
    except Exception as e:
        log.exception("DreamArtist training failed")
        raise HTTPException(status_code=500, detail=f"Training failed: {type(e).__name__}: {e}") from None
    return {"name": config.name, "negative_name": negative_name(config.name), "files": [str(f) for f in result.files],
            "final_loss": result.final_loss, "steps": result.step, "stopped": result.stopped}


def pairs() -> dict:
    """The DreamArtist pairs the webui knows (positive names; each has NAME-neg beside it)."""
    return {"pairs": embeddings.pairs()}


def _auth_dependencies() -> list:
    """With --api-auth user:password[,user:password...] the routes ask for those credentials, split as
    the webui splits them for /sdapi (no trimming), so the same logins work on both."""
    logins = getattr(shared.cmd_opts, "api_auth", None)
    if not logins:
        return []
    credentials = dict(login.split(":", 1) for login in logins.split(",") if ":" in login)

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
        expected = credentials.get(given.username)
        if expected is None or not secrets.compare_digest(given.password.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
    return [Depends(check)]


def register(app: FastAPI) -> None:
    dependencies = _auth_dependencies()
    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/pairs", pairs, methods=["GET"], dependencies=dependencies)


def on_app_started(demo, app: FastAPI) -> None:
    """Add the routes when the webui serves its API (--api, or --nowebui which implies it)."""
    if getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False):
        register(app)
