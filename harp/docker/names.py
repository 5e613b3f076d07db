"""Payloads of ``/docker/exapp/*`` and the resource names derived from them.

AppAPI sends the *app id* (``name``), an ``instance_id`` that is always ``""`` today and an
optional ``role_suffix``; HaRP derives ``nc_app_[<instance_id>_]<name>[_<role_suffix>]`` for
the container and ``nc_app_[<instance_id>_]<name>_data`` for its volume
(docs/compatibility.md#docker-lifecycle-endpoints).  Those names end up inside Engine API
URLs (``/containers/<n>/json``, ``/volumes/<v>``), so every part is checked against Docker's
own name alphabet here, once: nothing that passes can add a path segment, a query or a
fragment to an engine URL.

Validation errors are :class:`PayloadError`; their text follows the reference's
``Payload validation error: …`` answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

#: Docker's container/volume name alphabet; the first character must be alphanumeric.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: An image reference: registry[:port]/path[:tag][@digest].  No ``..`` segment, no
#: ``?``/``#``/``%``/space, so it cannot step out of ``/images/<ref>/...``.
_IMAGE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}")
#: A network name (``host``, ``bridge``, ``nextcloud-aio`` ...), a JSON key for the engine.
_NETWORK_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")

COMPUTE_DEVICES: Final = ("cpu", "cuda", "rocm")
PREFIX: Final = "nc_app_"


class PayloadError(ValueError):
    """The request body is not what the endpoint accepts (→ 400)."""


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``; ``Invalid JSON body`` otherwise (reference wording).

    Nesting deeper than the parser's recursion limit is invalid too (a ``RecursionError``
    would otherwise be an internal error with a traceback, docs/security.md#logging)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PayloadError("Invalid JSON body") from None
    if not isinstance(value, dict):
        raise PayloadError("Payload validation error: expected a JSON object")
    return value


def _invalid(field: str, why: str) -> PayloadError:
    return PayloadError(f"Payload validation error: {field}: {why}")


def _string(payload: dict[str, Any], field: str, default: str | None = None) -> str:
    value = payload.get(field, default)
    if value is None:
        if default is not None:
            return default
        raise _invalid(field, "field required")
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    return value


def _bool(payload: dict[str, Any], field: str, default: bool) -> bool:
    value = payload.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(field, "must be a boolean")
    return value


def _name_part(payload: dict[str, Any], field: str, required: bool) -> str:
    value = _string(payload, field, None if required else "")
    if not value and not required:
        return ""
    if not _NAME_RE.fullmatch(value):
        raise _invalid(
            field, "must be 1-128 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return value


def valid_image_ref(ref: str) -> bool:
    """An image reference that is safe inside ``/images/<ref>/...`` engine paths."""
    if not _IMAGE_RE.fullmatch(ref):
        return False
    return not any(part in ("", ".", "..") for part in ref.split("/"))


def image_path(ref: str) -> str:
    """``ref`` for an engine URL path (checked by :func:`valid_image_ref` before)."""
    return quote(ref, safe="/:@")


@dataclass(frozen=True, slots=True)
class ExAppName:
    """``{name, instance_id="", role_suffix=""}`` and the names derived from it."""

    name: str
    instance_id: str = ""
    role_suffix: str = ""

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> ExAppName:
        return cls(
            _name_part(payload, "name", required=True),
            _name_part(payload, "instance_id", required=False),
            _name_part(payload, "role_suffix", required=False),
        )

    @property
    def base(self) -> str:
        """``nc_app_[<instance_id>_]<name>``."""
        if self.instance_id:
            return f"{PREFIX}{self.instance_id}_{self.name}"
        return f"{PREFIX}{self.name}"

    @property
    def container(self) -> str:
        return f"{self.base}_{self.role_suffix}" if self.role_suffix else self.base

    @property
    def volume(self) -> str:
        """Always without the role suffix: every role of an app shares its data."""
        return f"{self.base}_data"


@dataclass(frozen=True, slots=True)
class MountPoint:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True, slots=True)
class CreatePayload:
    """``/docker/exapp/create``: unknown keys are ignored, as in the reference."""

    exapp: ExAppName
    image: str
    network_mode: str
    environment: tuple[str, ...]
    restart_policy: str
    compute_device: str
    mounts: tuple[MountPoint, ...]
    memory: int | None
    nano_cpus: int | None

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> CreatePayload:
        exapp = ExAppName.parse(payload)
        image = payload.get("image_id", payload.get("image"))
        if not isinstance(image, str) or not image:
            raise _invalid("image_id", "field required (a non-empty image reference)")
        if not valid_image_ref(image):
            raise _invalid("image_id", "not a valid image reference")
        network = _string(payload, "network_mode", "bridge")
        if not _NETWORK_RE.fullmatch(network):
            raise _invalid("network_mode", "not a valid network name")
        env = payload.get("environment_variables") or []
        if not isinstance(env, list) or not all(isinstance(item, str) for item in env):
            raise _invalid("environment_variables", "must be a list of strings")
        restart = _string(payload, "restart_policy", "unless-stopped")
        if restart not in ("no", "always", "unless-stopped", "on-failure"):
            raise _invalid("restart_policy", "must be no, always, unless-stopped or on-failure")
        device = _string(payload, "compute_device", "cpu").lower()
        if device not in COMPUTE_DEVICES:
            raise _invalid("compute_device", "must be cpu, cuda or rocm")
        mounts = tuple(_mount(item) for item in _list(payload, "mount_points"))
        limits = payload.get("resource_limits") or {}
        if not isinstance(limits, dict):
            raise _invalid("resource_limits", "must be an object")
        return cls(
            exapp, image, network, tuple(env), restart, device, mounts,
            _limit(limits, "memory"), _limit(limits, "nanoCPUs"),
        )


def _list(payload: dict[str, Any], field: str) -> list[Any]:
    value = payload.get(field) or []
    if not isinstance(value, list):
        raise _invalid(field, "must be a list")
    return value


def _mount(item: Any) -> MountPoint:
    if not isinstance(item, dict):
        raise _invalid("mount_points", "each entry must be an object")
    source, target = item.get("source"), item.get("target")
    if not isinstance(source, str) or not source or not isinstance(target, str) or not target:
        raise _invalid("mount_points", "source and target are required strings")
    mode = item.get("mode") or "rw"
    if mode not in ("rw", "ro"):
        raise _invalid("mount_points", "mode must be rw or ro")
    return MountPoint(source, target, mode == "ro")


def _limit(limits: dict[str, Any], field: str) -> int | None:
    """A resource limit; AppAPI's UI may send ``null``: null or ≤ 0 means unset."""
    value = limits.get(field)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise _invalid(f"resource_limits.{field}", "must be an integer")
    return value if value > 0 else None


@dataclass(frozen=True, slots=True)
class RemovePayload:
    exapp: ExAppName
    remove_data: bool

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> RemovePayload:
        return cls(ExAppName.parse(payload), _bool(payload, "remove_data", False))


@dataclass(frozen=True, slots=True)
class CertificatesPayload:
    exapp: ExAppName
    system_certs_bundle: str | None
    install_frp_certs: bool

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> CertificatesPayload:
        bundle = payload.get("system_certs_bundle")
        if bundle is not None and not isinstance(bundle, str):
            raise _invalid("system_certs_bundle", "must be a string or null")
        return cls(
            ExAppName.parse(payload), bundle or None, _bool(payload, "install_frp_certs", True)
        )


def parse_image_ref(payload: dict[str, Any]) -> str:
    """``/docker/exapp/image_remove``'s ``{image_ref}``."""
    ref = _string(payload, "image_ref")
    if not valid_image_ref(ref):
        raise _invalid("image_ref", "not a valid image reference")
    return ref
