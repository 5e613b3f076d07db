"""``/docker/exapp/*``: the container lifecycle HaRP runs for AppAPI (reference §3.4, §8).

AppAPI never creates, starts or execs containers through the raw passthrough: it asks HaRP
with a small JSON body naming the app, and HaRP makes the Engine calls itself, unversioned
like the reference, on the engine that ``docker-engine-port`` selects
(:mod:`harp.docker.engines`).  Every endpoint is a coroutine on the reactor — no thread, no
blocking client — bounded by the reference's timeout for it (15 s exists, 60 s create, 30 s
start/stop/remove/image_remove, 105 s wait_for_start, 120 s install_certificates); running
out of time is 504, an engine that cannot be reached 503 (we keep those statuses where the
reference says 500, audit notes).

Replies keep the reference's exact shapes, because AppAPI checks them: ``create`` → 201
``{"id","name"}``; ``start``/``stop`` → 204, or 200 when already in that state (which
AppAPI's deploy treats as an error, so ``install_certificates`` must put a stopped container
back to stopped); ``wait_for_start`` → always 200 ``{"started","status","health"[,"reason"]}``.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.server import NOT_DONE_YET, Request

from harp.docker.archive import read_file
from harp.docker.engines import (
    Deadline,
    EngineClient,
    EngineEndpoints,
    EngineError,
    EngineSelectionError,
    EngineTimeout,
    EngineUnavailable,
    engine_pool,
    parse_port,
)
from harp.docker.names import (
    CertificatesPayload,
    CreatePayload,
    ExAppName,
    PayloadError,
    RemovePayload,
    image_path,
    parse_image_ref,
    parse_json_object,
)
from harp.logs import HarpLogger
from harp.web import responses
from harp.web.control import ControlPlane
from harp.web.headers import last_header

log = HarpLogger("harp.docker")

P = TypeVar("P")

TIMEOUT_EXISTS: Final = 15.0
TIMEOUT_CREATE: Final = 60.0
TIMEOUT_SHORT: Final = 30.0
TIMEOUT_WAIT: Final = 105.0
TIMEOUT_CERTS: Final = 120.0
WAIT_TRIES: Final = 180
WAIT_INTERVAL: Final = 0.5

MISSING_PORT: Final = b"Missing 'docker-engine-port' header."
FRP_CERT_FILES: Final = ("ca.crt", "client.crt", "client.key")
FRP_CERTS_TARGET: Final = "certs/frp"
_DEBIAN_LIKE: Final = ("alpine", "debian", "ubuntu")
_RHEL_LIKE: Final = ("centos", "almalinux", "rhel", "fedora")
_PEM_RE: Final = re.compile(
    r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
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


def _engine_status(what: str, status: int) -> EngineUnavailable:
    """An engine answer HaRP has no mapping for: 503, naming the engine's status."""
    return EngineUnavailable(f"{what}: Status {status}")


Operation = Callable[[EngineClient, P, Deadline], Awaitable[Outcome]]


class DockerLifecycle:
    """The ``/docker/exapp/*`` handlers, registered on the control plane."""

    def __init__(
        self, reactor: Any, endpoints: EngineEndpoints, frp_certs_dir: Path | None
    ) -> None:
        self.reactor = reactor
        self.endpoints = endpoints
        self.frp_certs_dir = frp_certs_dir
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=engine_pool(reactor))

    def register(self, control: ControlPlane) -> None:
        routes: list[tuple[bytes, Callable[[Request, bytes], bytes | int]]] = [
            (b"exists", self._endpoint(ExAppName.parse, self.exists, TIMEOUT_EXISTS)),
            (b"create", self._endpoint(CreatePayload.parse, self.create, TIMEOUT_CREATE)),
            (b"start", self._endpoint(ExAppName.parse, self.start, TIMEOUT_SHORT)),
            (b"stop", self._endpoint(ExAppName.parse, self.stop, TIMEOUT_SHORT)),
            (b"wait_for_start",
             self._endpoint(ExAppName.parse, self.wait_for_start, TIMEOUT_WAIT, cancel=True)),
            (b"remove", self._endpoint(RemovePayload.parse, self.remove, TIMEOUT_SHORT)),
            (b"image_remove",
             self._endpoint(parse_image_ref, self.image_remove, TIMEOUT_SHORT)),
            (b"install_certificates",
             self._endpoint(CertificatesPayload.parse, self.install_certificates,
                            TIMEOUT_CERTS)),
        ]
        for name, handler in routes:
            control.add(b"POST", b"/docker/exapp/" + name, handler)

    # ------------------------------------------------------------------ plumbing

    def _endpoint(
        self,
        parse: Callable[[dict[str, Any]], P],
        operation: Operation[P],
        seconds: float,
        cancel: bool = False,
    ) -> Callable[[Request, bytes], bytes | int]:
        """Header → engine, body → payload, then run ``operation`` within ``seconds``."""

        def handle(request: Request, rest: bytes) -> bytes | int:
            raw_port = last_header(request, b"docker-engine-port")
            if not raw_port or not raw_port.strip():
                return responses.send(request, 400, MISSING_PORT)
            try:
                port = parse_port(raw_port)
            except EngineSelectionError as exc:
                return responses.send_json(request, exc.status, exc.payload())
            try:
                body = request.content.read() if request.content is not None else b""
                payload = parse(parse_json_object(body))
            except PayloadError as exc:
                return responses.send(request, 400, str(exc).encode())
            try:
                self.endpoints.require(port)
            except EngineSelectionError as exc:
                return responses.send_json(request, exc.status, exc.payload())
            client = EngineClient(self.reactor, self.agent, port)
            running = Deferred.fromCoroutine(
                _as_coroutine(operation(client, payload, Deadline(self.reactor, seconds)))
            )
            running.addCallbacks(
                lambda outcome: _reply(request, outcome),
                lambda failure: _failed(request, failure, rest),
            )
            if cancel:
                # Nobody waits for the answer any more: stop polling the engine.
                request.notifyFinish().addErrback(lambda _: running.cancel())
            return NOT_DONE_YET

        return handle

    # ------------------------------------------------------------------ endpoints

    async def exists(self, engine: EngineClient, app: ExAppName, deadline: Deadline) -> Outcome:
        reply = await engine.call(b"GET", f"/containers/{app.container}/json", deadline)
        if reply.status == 200:
            info = reply.json() or {}
            config = info.get("Config") or {}
            image = config.get("Image") or info.get("Image") or ""
            return _json(200, {"exists": True, "image_ref": image})
        if reply.status == 404:
            return _json(200, {"exists": False})
        raise _engine_status("Error communicating with Docker Engine", reply.status)

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
                raise _engine_status(f"Failed to create volume '{volume}'", made.status)
        elif reply.status != 200:
            raise _engine_status(f"Error inspecting volume '{volume}'", reply.status)
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
        raise _engine_status(f"Error creating container '{app.container}'", reply.status)

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
        raise _engine_status(f"Error {verb}ing container '{app.container}'", reply.status)

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
                raise _engine_status(f"Error inspecting container '{app.container}'",
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
            raise _engine_status(f"Error removing container '{app.container}'", reply.status)
        if spec.remove_data:
            reply = await engine.call(b"DELETE", f"/volumes/{app.volume}", deadline)
            if reply.status == 409:
                return _text(409, f"Volume '{app.volume}' is in use and could not be removed.")
            if reply.status not in (204, 404):
                raise _engine_status(f"Error removing volume '{app.volume}'", reply.status)
        log.info("removed {name} (data: {data})", name=app.container, data=spec.remove_data)
        return NO_CONTENT

    async def image_remove(self, engine: EngineClient, ref: str, deadline: Deadline) -> Outcome:
        not_found = _json(200, {"deleted": True, "bytes_freed": 0, "reason": "not_found"})
        path = f"/images/{image_path(ref)}"
        reply = await engine.call(b"GET", path + "/json", deadline)
        if reply.status == 404:
            return not_found
        if reply.status != 200:
            raise _engine_status(f"Error inspecting image '{ref}'", reply.status)
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
        raise _engine_status(f"Error removing image '{ref}'", reply.status)

    async def install_certificates(
        self, engine: EngineClient, spec: CertificatesPayload, deadline: Deadline
    ) -> Outcome:
        """Put the CA and FRP files into the container, then run the CA update if needed.

        Every file goes in first, through the archive API, which works on a stopped
        container (hardening hole 14): the ExApp's entrypoint decides at its first start
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
            raise _engine_status("Failed to inspect container", reply.status)
        was_running = bool(((reply.json() or {}).get("State") or {}).get("Running"))
        files, update = await self._files_to_install(engine, name, spec, deadline)
        if files:
            await _put_files(engine, name, files, deadline)
        if update:
            await self._run_ca_update(engine, name, update, was_running, deadline)
        return NO_CONTENT

    async def _files_to_install(
        self, engine: EngineClient, name: str, spec: CertificatesPayload, deadline: Deadline
    ) -> tuple[dict[str, bytes], list[str]]:
        """Every file to copy (path relative to ``/`` → bytes) and the CA update command."""
        files: dict[str, bytes] = {}
        update: list[str] = []
        pems = _PEM_RE.findall(spec.system_certs_bundle or "")
        if pems:
            os_release = await read_file(engine, name, "/etc/os-release", deadline)
            target, command = ca_target(os_release.decode("utf-8", "replace")
                                        if os_release is not None else "")
            if target is None:
                log.warn("{name}: unknown OS, system CA certificates not installed", name=name)
            else:
                files.update({
                    f"{target.lstrip('/')}/custom_ca_cert_{i}.crt": pem.encode() + b"\n"
                    for i, pem in enumerate(pems)
                })
                update = command
                log.info("{name}: installing {n} CA certificates", name=name, n=len(pems))
        if spec.install_frp_certs:
            frp_files = self._frp_cert_files()
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
                raise _engine_status("Failed to start container", started.status)
        try:
            code, output = await _exec(engine, name, update, deadline)
            if code != 0:
                log.warn("{name}: {command} exited with {code}: {output}", name=name,
                         command=" ".join(update), code=code, output=output[:300])
        finally:
            if not was_running:
                # Put the container back the way it was, even after a failure or timeout.
                await _stop_quietly(engine, name, Deadline(self.reactor, TIMEOUT_SHORT))

    def _frp_cert_files(self) -> dict[str, bytes] | None:
        """``$HP_CERTS_DIR/frp/{ca.crt,client.crt,client.key}``, all or nothing."""
        if self.frp_certs_dir is None:
            return None
        files: dict[str, bytes] = {}
        for file_name in FRP_CERT_FILES:
            try:
                files[f"{FRP_CERTS_TARGET}/{file_name}"] = (
                    self.frp_certs_dir / file_name
                ).read_bytes()
            except OSError:
                return None
        return files


def container_config(spec: CreatePayload) -> dict[str, Any]:
    """The Engine ``containers/create`` body for an ExApp (reference §3.4, appapi §2.4)."""
    app = spec.exapp
    mounts: list[dict[str, Any]] = [
        {"Type": "volume", "Source": app.volume, "Target": f"/{app.volume}", "ReadOnly": False}
    ]
    mounts += [
        {"Type": "bind", "Source": m.source, "Target": m.target, "ReadOnly": m.read_only}
        for m in spec.mounts
    ]
    host: dict[str, Any] = {
        "NetworkMode": spec.network_mode,
        "Mounts": mounts,
        "RestartPolicy": {"Name": spec.restart_policy},
    }
    if spec.compute_device == "cuda":
        host["DeviceRequests"] = [
            {"Driver": "nvidia", "Count": -1, "Capabilities": [["compute", "utility"]]}
        ]
    elif spec.compute_device == "rocm":
        host["Devices"] = [
            {"PathOnHost": dev, "PathInContainer": dev, "CgroupPermissions": "rwm"}
            for dev in ("/dev/kfd", "/dev/dri")
        ]
    if spec.memory is not None:
        host["Memory"] = spec.memory
    if spec.nano_cpus is not None:
        host["NanoCPUs"] = spec.nano_cpus
    config: dict[str, Any] = {
        "Image": spec.image,
        "Hostname": app.name,
        "Env": list(spec.environment),
        "HostConfig": host,
    }
    if spec.network_mode not in ("host", "bridge"):
        config["NetworkingConfig"] = {
            "EndpointsConfig": {spec.network_mode: {"Aliases": [app.name]}}
        }
    return config


def ca_target(os_release: str) -> tuple[str | None, list[str]]:
    """Where system CA PEMs go and how they are activated, by ``/etc/os-release`` text."""
    text = os_release.lower()
    if any(name in text for name in _DEBIAN_LIKE):
        return "/usr/local/share/ca-certificates", ["update-ca-certificates"]
    if any(name in text for name in _RHEL_LIKE):
        return "/etc/pki/ca-trust/source/anchors", ["update-ca-trust", "extract"]
    return None, []


def tar_of(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``files`` (paths relative to ``/``), mode 0644, owner root.

    0644 as in the reference: ExApps that run as a non-root user must read the FRP
    client key to connect back to HaRP.  The engine creates missing parent folders.
    """
    out = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = now
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def demux(stream: bytes) -> bytes:
    """stdout+stderr of a Docker multiplexed stream (raw bytes if it is not one, e.g. TTY)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        header = stream[pos:pos + 8]
        if len(header) < 8 or header[0] not in (0, 1, 2) or header[1:4] != b"\0\0\0":
            return stream if not out else b"".join(out) + stream[pos:]
        (size,) = struct.unpack(">I", header[4:])
        out.append(stream[pos + 8:pos + 8 + size])
        pos += 8 + size
    return b"".join(out)


async def _exec(
    engine: EngineClient, name: str, command: list[str], deadline: Deadline
) -> tuple[int, str]:
    """Run ``command`` in the running container ``name``: (exit code, output)."""
    made = await engine.call(
        b"POST", f"/containers/{name}/exec", deadline,
        json_body={"AttachStdout": True, "AttachStderr": True, "Cmd": command},
    )
    if made.status != 201:
        raise _engine_status("Failed to create exec", made.status)
    exec_id = str((made.json() or {}).get("Id") or "")
    if not _EXEC_ID_RE.fullmatch(exec_id):
        raise EngineUnavailable("engine returned no usable exec id")
    started = await engine.call(
        b"POST", f"/exec/{exec_id}/start", deadline, json_body={"Detach": False, "Tty": False}
    )
    if started.status != 200:
        raise _engine_status("Failed to start exec", started.status)
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


async def _put_files(
    engine: EngineClient, name: str, files: dict[str, bytes], deadline: Deadline
) -> None:
    reply = await engine.call(
        b"PUT", f"/containers/{name}/archive", deadline, query=b"path=%2F",
        data=tar_of(files), content_type=b"application/x-tar",
    )
    if reply.status != 200:
        log.warn("{name}: archive upload failed: {status} {error}", name=name,
                 status=reply.status, error=reply.text())
        raise _engine_status("Failed to upload archive", reply.status)


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


async def _as_coroutine(awaitable: Awaitable[Outcome]) -> Outcome:
    return await awaitable


def _reply(request: Request, outcome: Outcome) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    if outcome.payload is not None:
        body = responses.send_json(request, outcome.status, outcome.payload)
    else:
        body = responses.send(request, outcome.status, (outcome.text or "").encode())
    responses.finish(request, body)


def _failed(request: Request, failure: Failure, rest: bytes) -> None:
    if failure.check(EngineError):
        error = failure.value
        assert isinstance(error, EngineError)
        log.warn("{path}: {error}", path=rest.decode("latin-1"), error=error.message)
        _reply(request, _text(error.status, error.message))
        return
    if failure.check(PayloadError):
        _reply(request, _text(400, str(failure.value)))
        return
    if failure.check(CancelledError):
        return  # the client went away (wait_for_start only)
    log.failure("{path} failed", failure, path=rest.decode("latin-1"))
    _reply(request, _text(500, "An unexpected error occurred."))
