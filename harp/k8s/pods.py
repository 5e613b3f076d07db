"""``wait_for_start``'s judgement of a Deployment's pods (pure: pod list in, verdict out).

AppAPI waits (up to 3700 s) for ``started: true``; every answer carries ``started``,
``status``, ``health``, ``reason`` and ``message`` (docs/kubernetes.md#endpoints):

* the first pod Running and Ready → started, ``running``/``ready``;
* Succeeded (an init-only app ran and exited 0) → started, ``succeeded``/``ready``;
* Failed or Unknown → not started, the phase / ``not_ready``;
* an image error (``ErrImagePull``, ``ImagePullBackOff``, ``InvalidImageName``) → not
  started at once, the reason as ``status`` and ``reason``, ``health: image_error``;
* no pod at all, and no Deployment either (never created, or removed meanwhile) →
  not started at once, ``NotFound``/``not_ready`` (:func:`not_found`): nothing would
  ever make a pod, so waiting could only end at the time limit;
* anything else → keep waiting.

:class:`PodWatch` holds the time limits: pulling an image may take up to an hour, but
once it is pulled the app has 90 s to become Ready; and the whole wait never exceeds
:data:`MAX_WAIT`, so AppAPI (which gives up after 3700 s) always gets an answer — the
reference restarts the 90 s at a pull that ends late, and can run past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

IMAGE_ERRORS: Final = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
#: Waiting reasons that still mean "image not there yet" (or no status at all).
_PULLING: Final = frozenset({"ContainerCreating", "PodInitializing"})
STARTUP_TIMEOUT: Final = 90.0
#: The longest wait of all, image pull included (docs/kubernetes.md#endpoints).
MAX_WAIT: Final = 3600.0
POLL_INTERVAL: Final = 1.0


@dataclass(frozen=True, slots=True)
class PodView:
    """What one poll saw of the first pod."""

    phase: str
    ready: bool
    reason: str | None
    message: str | None
    waiting_reason: str | None
    waiting_message: str
    #: The container has run (running or terminated): its image is there.
    container_ran: bool

    @classmethod
    def of(cls, pod: Any) -> PodView:
        status = (pod.get("status") if isinstance(pod, dict) else None) or {}
        conditions = status.get("conditions") or []
        ready = any(
            isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in conditions
        )
        containers = status.get("containerStatuses") or []
        state: dict[str, Any] = {}
        if containers and isinstance(containers[0], dict):
            state = containers[0].get("state") or {}
        waiting = state.get("waiting") or {}
        return cls(
            # No phase yet: the API server has not even set Pending; not "Unknown" (which
            # would end the wait at once).
            str(status.get("phase") or "Pending"), ready, status.get("reason"),
            status.get("message"), waiting.get("reason"), str(waiting.get("message") or ""),
            "running" in state or "terminated" in state,
        )

    @property
    def pulled(self) -> bool:
        """The image is there: the container ran, or waits for something else (e.g.
        ``CrashLoopBackOff``).  The reference also counts a running container that is not
        Ready yet as "still pulling", which gives a hanging app an hour instead of 90 s."""
        if self.container_ran:
            return True
        return self.waiting_reason is not None and self.waiting_reason not in _PULLING


def reply(started: bool, status: str, health: str, reason: str | None,
          message: str | None) -> dict[str, Any]:
    return {"started": started, "status": status, "health": health, "reason": reason,
            "message": message}


def not_found(deployment: str) -> dict[str, Any]:
    """The answer for a Deployment that is not there: ``NotFound`` is the API's own
    reason for it; ``not_ready`` keeps ``health`` to the reference's words."""
    return reply(False, "NotFound", "not_ready", "NotFound",
                 f"Deployment '{deployment}' not found.")


class PodWatch:
    """Successive polls of one Deployment's pods; :meth:`see` answers or says "wait"."""

    def __init__(self, now: float) -> None:
        self.started_at = now
        self.pulled_at: float | None = None
        self.phase = "unknown"
        self.reason: str | None = None
        self.message: str | None = None

    def see(self, pods: list[Any], now: float) -> dict[str, Any] | None:
        """The answer this poll decides, or None to poll again."""
        if not pods:
            self.phase = "Pending"
            return None
        pod = PodView.of(pods[0])
        self.phase, self.reason, self.message = pod.phase, pod.reason, pod.message
        if pod.phase == "Running" and pod.ready:
            return reply(True, "running", "ready", pod.reason, pod.message)
        if pod.phase == "Succeeded":
            return reply(True, "succeeded", "ready", pod.reason, pod.message)
        if pod.phase in ("Failed", "Unknown"):
            return reply(False, pod.phase, "not_ready", pod.reason, pod.message)
        if pod.waiting_reason in IMAGE_ERRORS:
            return reply(False, pod.waiting_reason, "image_error", pod.waiting_reason,
                         pod.waiting_message)
        if self.pulled_at is None and pod.pulled:
            self.pulled_at = now
        return None

    def expired(self, now: float) -> bool:
        if now - self.started_at > MAX_WAIT:
            return True
        return self.pulled_at is not None and now - self.pulled_at > STARTUP_TIMEOUT

    def timeout(self) -> dict[str, Any]:
        return reply(False, self.phase, "timeout", self.reason, self.message)
