"""HTTP API (webui started with --api): POST /dreamartist/v1/train, GET /dreamartist/v1/pairs and
GET /dreamartist/v1/identities.

The train call blocks until training ends, like /sdapi/v1/train/embedding, waiting its turn in the webui's GPU
queue. It trains a pair, or with "mode": "identity" an identity (a face image, and its face mask or else the face
found in it). The body is read as plain JSON and validated by TrainConfig.from_dict (IdentityConfig.from_dict), so
the module works with the pydantic 1 / fastapi 0.94 of A1111 and the pydantic 2 / fastapi 0.10x of Forge alike.
Everything that can be checked is checked before the request waits: the JSON, every option, the images' sizes from
their headers (the pixels are decoded only once it is this request's turn). Every problem is an HTTP error whose
JSON "detail" is one sentence per problem (the webui's API error handlers, which serve every route of the app, add
"error", "body" and "errors" beside it): 409 when the name is taken or another run holds it, other 4xx for a bad
request (422 for an identity photo without a mask in which no face is found), 501 when this webui cannot train, 503
when the loaded model cannot, other 5xx for a failure; never a 200 carrying an error. Responses name files, never
server paths.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from modules import call_queue, shared

from dreamartist.config import IdentityConfig, TrainConfig
from dreamartist.errors import DreamArtistError, InputError, ModelError, NameTaken, PairBusy
from dreamartist.images import MAX_IMAGE_BYTES, check_image_bytes, face_reference, load_image, prepare_reference
from dreamartist.names import negative_name

from . import embeddings, host, identities, jobs
from .face_detection import face_region

PREFIX = "/dreamartist/v1"
MAX_BODY_BYTES = 3 * MAX_IMAGE_BYTES  # an image and a mask in base64, with room to spare
MODES = {"pair": TrainConfig, "identity": IdentityConfig}
log = logging.getLogger("dreamartist")


def image_bytes(data: Any, what: str) -> bytes:
    """The bytes of a base64 image (a data-URL prefix is tolerated), checked for size before any decoding."""
    if not isinstance(data, str) or not data.strip():
        raise InputError(f"'{what}' must be a base64-encoded image.")
    payload = data.partition(",")[2] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"'{what}' is not valid base64.") from None
    check_image_bytes(raw, f"'{what}'")
    return raw


async def _json_object(request: Request) -> dict:
    """The body as a JSON object, read no further than MAX_BODY_BYTES."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPException(status_code=413, detail=f"The body is larger than {MAX_BODY_BYTES >> 20} MB.")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (UnicodeDecodeError, ValueError) as e:
        raise HTTPException(status_code=422, detail=f"The body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
        raise HTTPException(status_code=422, detail="The body must be a JSON object.")
    return body


async def train(request: Request) -> dict:
    """Train a pair (or an identity) from one reference image; returns the files written and the final loss."""
    fields = await _json_object(request)
    try:
        mode = fields.pop("mode", "pair")
        if not isinstance(mode, str) or mode not in MODES:
            raise InputError(f"'mode' must be {' or '.join(MODES)}; got {mode!r}.")
        image = image_bytes(fields.pop("image", None), "image")
        mask_data = fields.pop("mask", None)
        mask = image_bytes(mask_data, "mask") if mask_data is not None else None
        config = MODES[mode].from_dict(fields)
    except InputError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    unavailable = host.host_unsupported_reason()
    if unavailable:
        raise HTTPException(status_code=501, detail=unavailable)
    return await run_in_threadpool(_train_in_turn, config, image, mask)


def _references(config: TrainConfig | IdentityConfig, image: bytes, mask: bytes | None) -> list:
    size = jobs.training_size(config)
    if isinstance(config, IdentityConfig):
        photo = load_image(image)
        return [face_reference(photo, face_region(photo, mask), *size)]
    return [prepare_reference(load_image(image), *size, mask=load_image(mask, mask=True) if mask is not None else None)]


def _train_in_turn(config: TrainConfig | IdentityConfig, image: bytes, mask: bytes | None) -> dict:
    try:
        with call_queue.queue_lock:
            result = jobs.run_training(config, _references(config, image, mask))
    except (NameTaken, PairBusy) as e:
        raise HTTPException(status_code=409, detail=str(e)) from None
    except InputError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    except ModelError as e:  # the loaded model cannot be trained on (none, SDXL, lowvram): not the request's fault
        raise HTTPException(status_code=503, detail=str(e)) from None
    except DreamArtistError as e:  # TrainingStopped: non-finite loss, out of memory; the message says what was kept
        raise HTTPException(status_code=500, detail=str(e)) from None
    except Exception as e:
        log.exception("DreamArtist training failed")
        raise HTTPException(status_code=500, detail=f"Training failed: {type(e).__name__}: {e}") from None
    files = [f.name for f in result.files]
    if isinstance(config, IdentityConfig):
        names = {"name": config.name, "identity": files[0]}  # the identity file comes first
    else:
        names = {"name": config.name, "negative_name": negative_name(config.name)}
    return {**names, "files": files, "final_loss": result.final_loss, "steps": result.step, "stopped": result.stopped,
            "notes": result.notes}


def pairs() -> dict:
    """The DreamArtist pairs the webui knows (positive names; each has NAME-neg beside it)."""
    return {"pairs": embeddings.pairs()}


def identities_list() -> dict:
    """The identities in the webui's identities folder."""
    return {"identities": identities.saved_names()}


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
    app.add_api_route(f"{PREFIX}/identities", identities_list, methods=["GET"], dependencies=dependencies)


def on_app_started(demo, app: FastAPI) -> None:
    """Add the routes when the webui serves its API (--api, or --nowebui which implies it)."""
    if getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False):
        register(app)
