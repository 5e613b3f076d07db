"""Engine API bodies HaRP builds or reads for ``/docker/exapp/*``: pure, no I/O.

Kept apart from the calls that send them (:mod:`harp.docker.lifecycle`) so that the exact
bytes an engine receives — the ``containers/create`` config AppAPI's deploy depends on —
and the decoding of what it returns are checked in milliseconds, without an engine.
"""

from __future__ import annotations

import struct
from typing import Any

from harp.docker.names import CreatePayload


def container_config(spec: CreatePayload) -> dict[str, Any]:
    """The Engine ``containers/create`` body for an ExApp
    (docs/compatibility.md#docker-lifecycle-endpoints)."""
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
