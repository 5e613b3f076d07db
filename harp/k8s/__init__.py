"""The Kubernetes backend: AppAPI's ``kubernetes-install`` daemons via HaRP (docs/kubernetes.md).

AppAPI (Nextcloud 34+) asks HaRP to run ExApps as Deployments in one namespace, with the
``POST /exapps/app_api/k8s/exapp/*`` calls, and HaRP then routes ExApp requests to the
Service (or manual upstream) it finds for each app.  One concern per module, data flowing
one way:

* :mod:`~harp.k8s.settings`: the ``HP_K8S_*`` variables, parsed and validated (pure);
* :mod:`~harp.k8s.payloads`: AppAPI's request bodies, validated (pure);
* :mod:`~harp.k8s.manifests`: names, labels and the PVC/Deployment/Service bodies (pure);
* :mod:`~harp.k8s.pods` / :mod:`~harp.k8s.services`: reading pod and Service/Node objects
  (pure);
* :mod:`~harp.k8s.client`: the non-blocking API client (TLS, bearer token, deadlines,
  bounded concurrency);
* :mod:`~harp.k8s.discovery`: an app's upstream from the cluster;
* :mod:`~harp.k8s.lifecycle`: the endpoint operations;
* :mod:`~harp.k8s.routes`: their HTTP adapter, ``/info`` and the ``/exapp_storage`` wrapper;
* :mod:`~harp.k8s.probe`: the cached, bounded reachability probe of ``/info``.

This package imports nothing at import time, so :mod:`harp.config` can use its settings
parser without pulling in Twisted's HTTP client.
"""
