"""The Kubernetes bearer token as it is now (the daemon's client and ``harp check`` share it).

``HP_K8S_BEARER_TOKEN`` wins; otherwise the token file is read again at every use, so a
projected service-account token that the kubelet rotates (about hourly) is picked up
without a restart.  The token is returned, never logged.
"""

from __future__ import annotations

from harp.k8s.settings import K8sSettings


def read_token(settings: K8sSettings) -> str | None:
    """The static token, else the file's current content; None when there is none."""
    if settings.token:
        return settings.token
    if settings.token_file is None:
        return None
    try:
        token = settings.token_file.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None
