"""``/exapp_storage/<appid>``: AppAPI pushes ExApp records on enable, deletes on disable."""

from __future__ import annotations

import json
from typing import Final

from twisted.web.server import Request

from harp.exapps import ExAppRecord, RecordError, parse_record
from harp.logs import HarpLogger
from harp.state import State
from harp.web import responses

log = HarpLogger("harp.storage")

PREFIX: Final = b"/exapp_storage/"
MAX_RECORD: Final = 1 << 20


def app_id_of(rest: bytes) -> str | None:
    """The app id of ``/exapp_storage/<appid>``, lower-cased; None if malformed."""
    raw = rest[len(PREFIX) :]
    if not raw or b"/" in raw or len(raw) > 255:
        return None
    return raw.decode("latin-1").lower()


def read_record(request: Request, rest: bytes) -> tuple[str, ExAppRecord] | bytes:
    """A pushed record, validated, or the error response to send (for ``render``)."""
    app_id = app_id_of(rest)
    if app_id is None:
        return responses.error(request, 404)
    content = request.content
    body = content.read(MAX_RECORD + 1) if content is not None else b""
    if len(body) > MAX_RECORD:
        return responses.send(request, 413, b"Payload too large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # nested too deep is invalid too, not an error
        return responses.send(request, 400, b"Invalid JSON body")
    try:
        return app_id, parse_record(app_id, data)
    except RecordError as exc:
        return responses.send(request, 400, f"Payload validation error: {exc}".encode())


class ExAppStorage:
    def __init__(self, state: State) -> None:
        self.state = state

    def post(self, request: Request, rest: bytes) -> bytes:
        parsed = read_record(request, rest)
        if isinstance(parsed, bytes):
            return parsed
        return self.put(request, *parsed)

    def put(self, request: Request, app_id: str, record: ExAppRecord) -> bytes:
        """Store a pushed record (after harp.k8s may have given it its upstream)."""
        self.state.put_exapp(app_id, record)
        log.info("ExApp {app} registered: {host}:{port}, {n} routes", app=app_id,
                 host=record.host, port=record.port, n=len(record.routes))
        return responses.send(request, 204, b"")

    def delete(self, request: Request, rest: bytes) -> bytes:
        app_id = app_id_of(rest)
        if app_id is None or not self.state.delete_exapp(app_id):
            return responses.error(request, 404)
        log.info("ExApp {app} removed", app=app_id)
        return responses.send(request, 204, b"")
