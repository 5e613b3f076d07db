"""wait_for_start's state machine on a fake engine and a fake clock.

The podman case (``Health: {"Status": ""}`` for a container without a health check) only
shows against podman, which the interop suite runs only with ``ENGINE=podman``; this pins
the rule here: an empty health status is "no health check", answered at once.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from harp.docker.client import Deadline, EngineReply, EngineTimeout
from harp.docker.lifecycle import TIMEOUT_WAIT, DockerLifecycle, Outcome
from harp.docker.names import ExAppName


class FakeEngine:
    """Answers inspect calls from a list of (status, State) pairs; the last one repeats."""

    def __init__(self, clock: Clock, states: list[tuple[int, dict[str, Any] | None]]) -> None:
        self.reactor = clock
        self.states = states
        self.calls = 0

    async def call(self, method: bytes, path: str, deadline: Deadline, **_: Any) -> EngineReply:
        if deadline.expired:
            raise EngineTimeout("timeout")
        status, state = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        body = json.dumps({"State": state}).encode() if state is not None else b"{}"
        return EngineReply(status, Headers(), body)


def run(states: list[tuple[int, dict[str, Any] | None]], advance: float = 0.0) -> Outcome:
    clock = Clock()
    lifecycle = DockerLifecycle(clock, None)
    engine = FakeEngine(clock, states)
    result: list[Outcome] = []
    Deferred.fromCoroutine(
        lifecycle.wait_for_start(engine, ExAppName("app"), Deadline(clock, TIMEOUT_WAIT))  # type: ignore[arg-type]
    ).addCallback(result.append)
    step = 0.5
    waited = 0.0
    while not result and waited <= advance:
        clock.advance(step)
        waited += step
    assert result, "wait_for_start did not finish"
    return result[0]


def test_podman_empty_health_is_no_health_check() -> None:
    outcome = run([(200, {"Status": "running", "Health": {"Status": ""}})])
    assert outcome.payload == {"started": True, "status": "running", "health": None}


def test_docker_no_health() -> None:
    outcome = run([(200, {"Status": "running"})])
    assert outcome.payload == {"started": True, "status": "running", "health": None}


def test_starting_then_healthy() -> None:
    outcome = run([
        (200, {"Status": "created"}),
        (200, {"Status": "running", "Health": {"Status": "starting"}}),
        (200, {"Status": "running", "Health": {"Status": "healthy"}}),
    ], advance=5)
    assert outcome.payload == {"started": True, "status": "running", "health": "healthy"}


def test_unhealthy_counts_as_started_with_reason() -> None:
    outcome = run([(200, {"Status": "running", "Health": {"Status": "unhealthy"}})])
    assert outcome.payload == {
        "started": True, "status": "running", "health": "unhealthy", "reason": "unhealthy"
    }


def test_exited_and_missing() -> None:
    assert run([(200, {"Status": "exited"})]).payload == {
        "started": False, "status": "exited", "health": None,
        "reason": "non-recoverable state: exited",
    }
    assert run([(404, None)]).payload == {
        "started": False, "status": "not_found", "reason": "container not found"
    }


def test_never_ready_ends_with_max_tries() -> None:
    outcome = run([(200, {"Status": "running", "Health": {"Status": "starting"}})],
                  advance=TIMEOUT_WAIT + 5)
    assert outcome.payload is not None
    assert outcome.payload["started"] is False
    assert outcome.payload["status"] == "running"
    assert outcome.payload["health"] == "starting"
    # 180 tries x 0.5 s = 90 s < the 105 s overall budget
    assert outcome.payload["reason"] == "timeout after max tries"


def test_engine_json_nested_too_deep_is_not_json() -> None:
    """An engine's answer nested past the parser's recursion limit reads as "not JSON"
    (None), like any other garbage, instead of raising inside a request."""
    assert EngineReply(200, Headers(), b"[" * 100_000).json() is None
    assert EngineReply(200, Headers(), b'{"Id": "x"}').json() == {"Id": "x"}
