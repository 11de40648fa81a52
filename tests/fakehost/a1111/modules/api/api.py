"""modules.api.api: what the webui's own API (--api, --nowebui) does to every route of the app it shares with
extensions: its error handlers answer each exception, HTTPException included, as one JSON shape."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse


def api_middleware(app: FastAPI) -> None:
    """{"error": class name, "detail", "body", "errors": str(e)} with the exception's status (500 without one);
    an HTTPException's headers are not passed on."""
    def handle_exception(request: Request, e: Exception) -> JSONResponse:
        err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""),
               "errors": str(e)}
        return JSONResponse(status_code=vars(e).get("status_code", 500), content=jsonable_encoder(err))

    @app.middleware("http")
    async def exception_handling(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as e:
            return handle_exception(request, e)

    @app.exception_handler(Exception)
    async def fastapi_exception_handler(request: Request, e: Exception):
        return handle_exception(request, e)

    @app.exception_handler(HTTPException)
    async def http_exception_handler(request: Request, e: HTTPException):
        return handle_exception(request, e)


class Api:
    """The webui's API object, as far as an extension's routes meet it: the queue lock and the error handlers
    (the /sdapi routes themselves are not stood in for)."""

    def __init__(self, app: FastAPI, queue_lock):
        self.app = app
        self.queue_lock = queue_lock
        api_middleware(self.app)
