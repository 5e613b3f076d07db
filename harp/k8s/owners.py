"""Which ExApp an object HaRP made belongs to, so that two ExApps whose Kubernetes names
collide never act on each other's objects (pure; docs/kubernetes.md#behaviour).

Names are cut and folded exactly as the reference does (63 characters, lower case,
``_``/``.`` → ``-``), so ``nc_app_<56+ equal characters>…`` or ``MyApp``/``myapp`` map to
one Deployment.  Changing the names would lose the objects the reference (or an older
HaRP) made; instead every object HaRP makes records its ExApp unchanged
(:func:`~harp.k8s.manifests.owner_annotations`), and an operation that finds an object of
its name recorded for another ExApp is refused with 409 (:class:`NameTaken`) before it
changes anything.  An object without the record (made by the reference, an older HaRP, or
by hand) is taken as the caller's, as before.
"""

from __future__ import annotations

from typing import Any

from harp.docker.client import EngineError
from harp.docker.names import ExAppName
from harp.k8s.manifests import ANNOTATION_EXAPP, ANNOTATION_ROLE


class NameTaken(EngineError):
    """The object named for this ExApp is recorded as another's: 409 with the message."""

    status = 409


def recorded_owner(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(``nc_app_[<instance>_]<name>``, role suffix) recorded on ``obj``; None without."""
    annotations = (obj.get("metadata") or {}).get("annotations")
    if not isinstance(annotations, dict):
        return None
    base = annotations.get(ANNOTATION_EXAPP)
    if not isinstance(base, str) or not base:
        return None
    role = annotations.get(ANNOTATION_ROLE)
    return base, role if isinstance(role, str) else ""


def check(obj: dict[str, Any], app: ExAppName, kind: str, name: str,
          roles_share: bool = False) -> None:
    """Raise :class:`NameTaken` when ``obj`` (``kind`` ``name``) is another ExApp's.

    ``roles_share``: the object is the app's, whatever the role (the PVC)."""
    owner = recorded_owner(obj)
    if owner is None:
        return
    base, role = owner
    if base == app.base and (roles_share or role == app.role_suffix):
        return
    theirs = base if roles_share or not role else f"{base}_{role}"
    ours = app.base if roles_share else app.container
    raise NameTaken(
        f"{kind} '{name}' belongs to ExApp '{theirs}', not '{ours}': their Kubernetes "
        "names collide (cut to 63 characters, lower case, '_' and '.' as '-'). "
        "Use a shorter or more distinct app id."
    )


def belongs_to(obj: dict[str, Any], app_id: str) -> bool:
    """For routing: may ``obj`` serve ``app_id``?  Yes without a record; with one, if it
    names this app (in any case: routed app ids are lower case)."""
    owner = recorded_owner(obj)
    return owner is None or owner[0].lower() == ExAppName(app_id).base.lower()
