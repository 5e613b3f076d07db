"""The ExApp container lifecycle HaRP runs on an engine for AppAPI
(docs/compatibility.md#docker-lifecycle-endpoints).

AppAPI never creates, starts or execs containers through the raw passthrough: it asks HaRP
with a small JSON body naming the app (:mod:`harp.docker.routes`), and HaRP makes the Engine
calls itself, unversioned like the reference, through :class:`~harp.docker.client.EngineClient`.
Each operation here is a coroutine on the reactor — no thread, no blocking client — that
shares one :class:`~harp.docker.client.Deadline`, the reference's time budget for it (15 s
exists, 60 s create, 30 s start/stop/remove/image_remove, 105 s wait_for_start, 120 s
install_certificates).  An operation returns the :class:`Outcome` to answer, or raises an
:class:`~harp.docker.client.EngineError` carrying its status (503 unreachable, 504 out of
time; we keep those where the reference says 500, docs/differences.md#15).

Outcomes keep the reference's exact shapes, because AppAPI checks them: ``create`` → 201
``{"id","name"}``; ``start``/``stop`` → 204, or 200 when already in that state (which
AppAPI's deploy treats as an error, so ``install_certificates`` must put a stopped container
back to stopped); ``wait_for_start`` → always 200 ``{"started","status","health"[,"reason"]}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from twisted.internet.task import deferLater

from harp.docker.archive import read_file, write_files
from harp.docker.certificates import bundle_certificates, ca_files, ca_target, frp_client_files
from harp.docker.client import (
    Deadline,
    EngineClient,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    unexpected_status,
)
from harp.docker.names import (
    CertificatesPayload,
    CreatePayload,
    ExAppName,
    RemovePayload,
    image_path,
)
from harp.docker.wire import container_config, demux
from harp.logs import HarpLogger

log = HarpLogger("harp.docker")

TIMEOUT_EXISTS: Final = 15.0
TIMEOUT_CREATE: Final = 60.0
TIMEOUT_SHORT: Final = 30.0
TIMEOUT_WAIT: Final = 105.0
TIMEOUT_CERTS: Final = 120.0
WAIT_TRIES: Final = 180
WAIT_INTERVAL: Final = 0.5

_EXEC_ID_RE: Final = re.compile(r"[A-Za-z0-9]{1,128}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an endpoint answers: JSON (``payload``), plain text, or nothing (204)."""

    status: int
    payload: Any = None
    text: str | None = None


def _json(status: int, payload: Any) -> Outcome:
    return Outcome(status, payload=payload)


def _text(status: int, text: str) -> Outcome:
    return Outcome(status, text=text)


NO_CONTENT: Final = Outcome(204)


class DockerLifecycle:
    """The ``/docker/exapp/*`` operations, each on one engine within one deadline."""

    def __init__(self, reactor: Any, frp_certs_dir: Path | None) -> None:
        self.reactor = reactor
        self.frp_certs_dir = frp_certs_dir

    async def exists(self, engine: EngineClient, app: ExAppName, deadline: Deadline) -> Outcome:
        reply = await engine.call(b"GET", f"/containers/{app.container}/json", deadline)
        if reply.status == 200:
            info = reply.json() or {}
            config = info.get("Config") or {}
            image = config.get("Image") or info.get("Image") or ""
            return _json(200, {"exists": True, "image_ref": image})
        if reply.status == 404:
            return _json(200, {"exists": False})
        raise unexpected_status("Error communicating with Docker Engine", reply.status)

    async def create(
        self, engine: EngineClient, spec: CreatePayload, deadline: Deadline
    ) -> Outcome:
        app = spec.exapp
        volume = app.volume
        reply = await engine.call(b"GET", f"/volumes/{volume}", deadline)
        if reply.status == 404:
            made = await engine.call(
                b"POST", "/volumes/create", deadline, json_body={"Name": volume}
            )
            if made.status != 201:
                raise unexpected_status(f"Failed to create volume '{volume}'", made.status)
        elif reply.status != 200:
            raise unexpected_status(f"Error inspecting volume '{volume}'", reply.status)
        reply = await engine.call(
            b"POST", "/containers/create", deadline,
            query=b"name=" + app.container.encode("ascii"), json_body=container_config(spec),
        )
        if reply.status == 201:
            created = reply.json() or {}
            log.info("created container {name}", name=app.container)
            return _json(201, {"id": created.get("Id"), "name": app.container})
        if reply.status == 409:
            return _text(409, f"Container with name '{app.container}' already exists.")
        log.warn("creating {name} failed: {status} {error}", name=app.container,
                 status=reply.status, error=reply.text())
        raise unexpected_status(f"Error creating container '{app.container}'", reply.status)

    async def start(self, engine: EngineClient, app: ExAppName, deadline: Deadline) -> Outcome:
        return await self._start_stop(engine, app, deadline, "start", "started")

    async def stop(self, engine: EngineClient, app: ExAppName, deadline: Deadline) -> Outcome:
        return await self._start_stop(engine, app, deadline, "stop", "stopped")

    async def _start_stop(
        self, engine: EngineClient, app: ExAppName, deadline: Deadline, verb: str, done: str
    ) -> Outcome:
        reply = await engine.call(b"POST", f"/containers/{app.container}/{verb}", deadline)
        if reply.status == 204:
            return NO_CONTENT
        if reply.status == 304:
            return _text(200, f"Container already {done}")
        if reply.status == 404:
            return _text(404, f"Container '{app.container}' not found.")
        log.warn("{verb} {name} failed: {status} {error}", verb=verb, name=app.container,
                 status=reply.status, error=reply.text())
        raise unexpected_status(f"Error {verb}ing container '{app.container}'", reply.status)

    async def wait_for_start(
        self, engine: EngineClient, app: ExAppName, deadline: Deadline
    ) -> Outcome:
        status: str | None = "unknown"
        health: str | None = None
        for attempt in range(WAIT_TRIES):
            try:
                reply = await engine.call(b"GET", f"/containers/{app.container}/json", deadline)
            except EngineTimeout:
                return _json(200, {"started": False, "status": status, "health": health,
                                   "reason": "overall timeout"})
            if reply.status == 404:
                return _json(200, {"started": False, "status": "not_found",
                                   "reason": "container not found"})
            if reply.status != 200:
                raise unexpected_status(f"Error inspecting container '{app.container}'",
                                     reply.status)
            state = (reply.json() or {}).get("State") or {}
            status = state.get("Status")
            # Podman reports Health {"Status": ""} for a container without a health
            # check; that is "no health check", not "not healthy yet".
            health = (state.get("Health") or {}).get("Status") or None
            if status == "running":
                if health in (None, "healthy"):
                    return _json(200, {"started": True, "status": status, "health": health})
                if health == "unhealthy":
                    return _json(200, {"started": True, "status": status, "health": health,
                                       "reason": "unhealthy"})
            elif status in ("paused", "exited", "dead"):
                return _json(200, {"started": False, "status": status, "health": health,
                                   "reason": f"non-recoverable state: {status}"})
            if attempt == WAIT_TRIES - 1:
                break
            pause = min(WAIT_INTERVAL, deadline.remaining())
            if pause <= 0:
                return _json(200, {"started": False, "status": status, "health": health,
                                   "reason": "overall timeout"})
            await deferLater(self.reactor, pause)
        return _json(200, {"started": False, "status": status, "health": health,
                           "reason": "timeout after max tries"})

    async def remove(
        self, engine: EngineClient, spec: RemovePayload, deadline: Deadline
    ) -> Outcome:
        app = spec.exapp
        reply = await engine.call(
            b"DELETE", f"/containers/{app.container}", deadline, query=b"force=true"
        )
        if reply.status not in (204, 404, 409):
            raise unexpected_status(f"Error removing container '{app.container}'", reply.status)
        if spec.remove_data:
            reply = await engine.call(b"DELETE", f"/volumes/{app.volume}", deadline)
            if reply.status == 409:
                return _text(409, f"Volume '{app.volume}' is in use and could not be removed.")
            if reply.status not in (204, 404):
                raise unexpected_status(f"Error removing volume '{app.volume}'", reply.status)
        log.info("removed {name} (data: {data})", name=app.container, data=spec.remove_data)
        return NO_CONTENT

    async def image_remove(self, engine: EngineClient, ref: str, deadline: Deadline) -> Outcome:
        not_found = _json(200, {"deleted": True, "bytes_freed": 0, "reason": "not_found"})
        path = f"/images/{image_path(ref)}"
        reply = await engine.call(b"GET", path + "/json", deadline)
        if reply.status == 404:
            return not_found
        if reply.status != 200:
            raise unexpected_status(f"Error inspecting image '{ref}'", reply.status)
        size = (reply.json() or {}).get("Size") or 0
        reply = await engine.call(b"DELETE", path, deadline)
        if reply.status == 200:
            operations = reply.json() or []
            deleted = any(isinstance(op, dict) and "Deleted" in op for op in operations)
            return _json(200, {"deleted": True, "bytes_freed": size if deleted else 0})
        if reply.status == 404:
            return not_found
        if reply.status == 409:
            return _json(200, {"deleted": False, "reason": "in_use"})
        raise unexpected_status(f"Error removing image '{ref}'", reply.status)

    async def install_certificates(
        self, engine: EngineClient, spec: CertificatesPayload, deadline: Deadline
    ) -> Outcome:
        """Put the CA and FRP files into the container, then run the CA update if needed.

        Every file goes in first, through the archive API, which works on a stopped
        container: the ExApp's entrypoint decides at its first start
        whether frpc uses TLS, so starting it before ``/certs/frp`` exists sent its first
        frpc login in plain text, which HaRP refuses.  The container is started only to
        run the CA update command, and then put back the way it was: AppAPI's next call
        is ``start``, which counts "already started" as an error.
        """
        name = spec.exapp.container
        reply = await engine.call(b"GET", f"/containers/{name}/json", deadline)
        if reply.status == 404:
            return _text(404, f"Container '{name}' not found.")
        if reply.status != 200:
            raise unexpected_status("Failed to inspect container", reply.status)
        was_running = bool(((reply.json() or {}).get("State") or {}).get("Running"))
        files, update = await self._files_to_install(engine, name, spec, deadline)
        if files:
            await write_files(engine, name, files, deadline)
        if update:
            await self._run_ca_update(engine, name, update, was_running, deadline)
        return NO_CONTENT

    async def _files_to_install(
        self, engine: EngineClient, name: str, spec: CertificatesPayload, deadline: Deadline
    ) -> tuple[dict[str, bytes], list[str]]:
        """Every file to copy (path relative to ``/`` → bytes) and the CA update command."""
        files: dict[str, bytes] = {}
        update: list[str] = []
        pems = bundle_certificates(spec.system_certs_bundle)
        if pems:
            os_release = await read_file(engine, name, "/etc/os-release", deadline)
            target, command = ca_target(os_release.decode("utf-8", "replace")
                                        if os_release is not None else "")
            if target is None:
                log.warn("{name}: unknown OS, system CA certificates not installed", name=name)
            else:
                files.update(ca_files(target, pems))
                update = command
                log.info("{name}: installing {n} CA certificates", name=name, n=len(pems))
        if spec.install_frp_certs:
            frp_files = frp_client_files(self.frp_certs_dir)
            if frp_files is None:
                log.info("{name}: no FRP client certificates on HaRP, none installed", name=name)
            else:
                files.update(frp_files)
                log.info("{name}: installing FRP client certificates", name=name)
        return files, update

    async def _run_ca_update(
        self, engine: EngineClient, name: str, update: list[str], was_running: bool,
        deadline: Deadline,
    ) -> None:
        """Run ``update`` (e.g. update-ca-certificates), starting the container if needed."""
        if not was_running:
            started = await engine.call(b"POST", f"/containers/{name}/start", deadline)
            if started.status not in (204, 304):
                raise unexpected_status("Failed to start container", started.status)
        try:
            code, output = await _exec(engine, name, update, deadline)
            if code != 0:
                log.warn("{name}: {command} exited with {code}: {output}", name=name,
                         command=" ".join(update), code=code, output=output[:300])
        finally:
            if not was_running:
                # Put the container back the way it was, even after a failure or timeout.
                await _stop_quietly(engine, name, Deadline(self.reactor, TIMEOUT_SHORT))


async def _exec(
    engine: EngineClient, name: str, command: list[str], deadline: Deadline
) -> tuple[int, str]:
    """Run ``command`` in the running container ``name``: (exit code, output)."""
    made = await engine.call(
        b"POST", f"/containers/{name}/exec", deadline,
        json_body={"AttachStdout": True, "AttachStderr": True, "Cmd": command},
    )
    if made.status != 201:
        raise unexpected_status("Failed to create exec", made.status)
    exec_id = str((made.json() or {}).get("Id") or "")
    if not _EXEC_ID_RE.fullmatch(exec_id):
        raise EngineUnavailable("engine returned no usable exec id")
    started = await engine.call(
        b"POST", f"/exec/{exec_id}/start", deadline, json_body={"Detach": False, "Tty": False}
    )
    if started.status != 200:
        raise unexpected_status("Failed to start exec", started.status)
    output = demux(started.body).decode("utf-8", "replace")
    for _ in range(20):
        inspected = await engine.call(b"GET", f"/exec/{exec_id}/json", deadline)
        if inspected.status != 200:
            return -1, output
        info = inspected.json() or {}
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"]), output
        await deferLater(engine.reactor, 0.1)
    return -1, output


async def _stop_quietly(engine: EngineClient, name: str, deadline: Deadline) -> None:
    try:
        reply = await engine.call(b"POST", f"/containers/{name}/stop", deadline)
    except EngineError as exc:
        log.warn("{name}: could not stop it again after installing certificates: {error}",
                 name=name, error=exc.message)
        return
    if reply.status not in (204, 304, 404):
        log.warn("{name}: stopping it again after installing certificates gave {status}",
                 name=name, status=reply.status)
