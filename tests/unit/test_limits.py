"""HP_MAX_CONNECTIONS: accepting pauses at the cap and resumes below it."""

from __future__ import annotations

from harp.web.limits import ConnectionLimit


class Port:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_pause_at_cap_and_resume() -> None:
    limit = ConnectionLimit(2)
    port = Port()
    limit.add_port(port)
    assert limit.try_open() and port.reading
    assert limit.try_open() and not port.reading
    assert not limit.try_open()  # accepted in the same wake-up: refused
    assert limit.open == 2
    limit.closed()
    assert port.reading and limit.open == 1


def test_port_added_while_paused_is_paused() -> None:
    limit = ConnectionLimit(1)
    assert limit.try_open()
    port = Port()
    limit.add_port(port)
    assert not port.reading
