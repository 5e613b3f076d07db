"""``HP_K8S_*``: can HaRP reach the Kubernetes API, and may it do its work there?

One request, the way the daemon authenticates (bearer token, CA verification): list the
Deployments of ``HP_K8S_NAMESPACE`` (``limit=1``), which every Kubernetes ExApp operation
needs.  So one answer tells apart an unreachable or untrusted API server, a refused token
(401) and a service account without the Role of docs/kubernetes.md#rbac (403).  The token is
never printed.  Skipped when the backend is off.
"""

from __future__ import annotations

import ssl
from typing import Final

from harp.check import http
from harp.check.result import Result, failed, passed, skipped
from harp.k8s.settings import K8sSettings
from harp.k8s.token import read_token

NAME: Final = "kubernetes"
_RBAC: Final = "bind HaRP's service account to the Role in docs/kubernetes.md#rbac"


def tls_context(settings: K8sSettings) -> ssl.SSLContext:
    """The daemon's verification rules, for the standard library's client."""
    if not settings.verify_ssl:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    ca = settings.ca_file
    if ca is not None and (settings.ca_file_explicit or ca.exists()):
        return ssl.create_default_context(cafile=str(ca))
    return ssl.create_default_context()


def kubernetes(settings: K8sSettings) -> Result:
    if not settings.enabled:
        return skipped(NAME, "HP_K8S_ENABLED is off (no Kubernetes daemons)")
    if not settings.api_server:
        return failed(NAME, "no API server configured",
                      "set HP_K8S_API_SERVER (or run HaRP in a pod)")
    token = read_token(settings)
    if token is None:
        return failed(NAME, f"no bearer token (HP_K8S_BEARER_TOKEN unset, "
                            f"{settings.token_file} missing or empty)",
                      "set HP_K8S_BEARER_TOKEN or HP_K8S_BEARER_TOKEN_FILE")
    where = settings.api_server
    path = f"/apis/apps/v1/namespaces/{settings.namespace}/deployments?limit=1"
    try:
        reply = http.get(where + path, {"Authorization": f"Bearer {token}",
                                        "Accept": "application/json"},
                         tls=tls_context(settings) if settings.https else None)
    except (http.Unreachable, OSError, ssl.SSLError) as exc:
        reason = exc.reason if isinstance(exc, http.Unreachable) else http.describe(exc)
        return failed(NAME, f"cannot reach the API server {where}: {reason}",
                      "check HP_K8S_API_SERVER, and HP_K8S_CA_FILE for https")
    if reply.status == 200:
        return passed(NAME, f"{where} answers; Deployments in {settings.namespace} "
                            "may be listed")
    if reply.status == 401:
        return failed(NAME, f"{where} refuses the bearer token (401)",
                      "give HaRP a valid service-account token (it may have expired)")
    if reply.status == 403:
        return failed(NAME, f"the token may not list Deployments in {settings.namespace} "
                            "(403)", _RBAC)
    return failed(NAME, f"{where} answered {reply.status} to listing Deployments",
                  "HP_K8S_API_SERVER must be the Kubernetes API server's URL")
