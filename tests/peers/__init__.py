"""Real peer programs for HaRP's tests.

HaRP is only useful if it interoperates with the programs it sits between, so the tests talk to
real peers over real sockets on 127.0.0.1 instead of mocking them:

* ``fake_nextcloud``: the two Nextcloud endpoints HaRP calls (``exapp-meta`` and ``user-info``);
* ``exapp`` / ``exapp_runner``: a genuine nc_py_api ExApp, run as a subprocess, whose own
  ``AppAPIAuthMiddleware`` checks the identity headers HaRP forwards;
* ``frpc``: the upstream FRP client (installed by ``tools/get-frpc``), configured the way an
  ExApp container's ``start.sh`` configures it.
"""
