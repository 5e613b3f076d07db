"""The AMP commands of the worker channel (one unix socketpair per worker).

Worker → primary: :class:`RecordFailure`, :class:`PutExApp`, :class:`DeleteExApp`,
:class:`CollectMetrics`.  Primary → worker: :class:`Ready`, :class:`SetExApp`,
:class:`Ban`, :class:`TunnelPorts`, :class:`Counters`.

AMP caps one value at 65 535 bytes, and an ExApp record may be up to 1 MiB of JSON, so
records and metrics travel as :class:`BigBytes`, split over several keys.
"""

from __future__ import annotations

import json
from typing import Any, Final

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from harp.exapps import ExAppRecord, parse_record

#: What one AMP value may hold (``twisted.protocols.amp.MAX_VALUE_LENGTH``).
CHUNK: Final = amp.MAX_VALUE_LENGTH


class BigBytes(amp.Argument):
    """Bytes of any length: ``name`` holds the number of chunks, ``name.<i>`` each chunk."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value: bytes | None = objects.pop(amp._wireNameToPythonIdentifier(name), None)
        if value is None:
            if not self.optional:
                raise KeyError(name)
            return
        chunks = [value[i : i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for i, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, i)] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        key = amp._wireNameToPythonIdentifier(name)
        count = strings.pop(name, None)
        if count is None:
            if not self.optional:
                raise KeyError(name)
            objects[key] = None
            return
        objects[key] = b"".join(strings.pop(b"%s.%d" % (name, i)) for i in range(int(count)))


# --- worker -> primary


class RecordFailure(amp.Command):
    """A failure counted in a worker (``key``: :func:`harp.bans.ban_key`)."""

    arguments = [(b"key", amp.Unicode())]
    requiresAnswer = False


class PutExApp(amp.Command):
    """``POST /exapp_storage``: answered once every worker holds the record."""

    arguments = [(b"app", amp.Unicode()), (b"record", BigBytes())]
    response = []


class DeleteExApp(amp.Command):
    """``DELETE /exapp_storage``: answered once every worker has dropped the record."""

    arguments = [(b"app", amp.Unicode())]
    response = [(b"found", amp.Boolean())]


class CollectMetrics(amp.Command):
    """``GET /metrics``: the whole (every worker's counters, the primary's gauges)."""

    arguments = []
    response = [(b"text", BigBytes())]


# --- primary -> worker


class Ready(amp.Command):
    """The snapshot (records, bans, tunnel ports) has been sent: start serving."""

    arguments = []
    response = []


class SetExApp(amp.Command):
    """Hold this record (its JSON source) for ``app``, or drop it (no ``record``)."""

    arguments = [(b"app", amp.Unicode()), (b"record", BigBytes(optional=True))]
    response = [(b"held", amp.Boolean())]


class Ban(amp.Command):
    """``key`` is banned for ``seconds`` more."""

    arguments = [(b"key", amp.Unicode()), (b"seconds", amp.Float())]
    requiresAnswer = False


class TunnelPorts(amp.Command):
    """The loopback ports with a live FRP tunnel (ExApps and Docker engines)."""

    arguments = [(b"ports", amp.ListOf(amp.Integer()))]
    requiresAnswer = False


class Counters(amp.Command):
    """This worker's request counters (JSON of :meth:`harp.metrics.Metrics.counters`)."""

    arguments = []
    response = [(b"data", BigBytes())]


# --- records on the channel: their JSON source


def record_json(record: ExAppRecord) -> bytes:
    return json.dumps(dict(record.source), separators=(",", ":")).encode()


def parse_record_json(app_id: str, raw: bytes) -> ExAppRecord:
    return parse_record(app_id, json.loads(raw))


class OneProtocol(Factory):
    """Hands out one existing AMP protocol: each end of a worker's socketpair is
    adopted as a connection whose protocol was made beforehand."""

    def __init__(self, protocol: amp.AMP) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: IAddress | None) -> amp.AMP:
        return self.protocol_instance
