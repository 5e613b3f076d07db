"""Real peer programs for HaRP's tests.

HaRP is only useful if it interoperates with the programs it sits between, so the tests talk to
real peers over real sockets on 127.0.0.1 instead of mocking them:

* ``fake_nextcloud``: the two Nextcloud endpoints HaRP calls (``exapp-meta`` and ``user-info``);
* ``exapp`` / ``exapp_runner``: a genuine nc_py_api ExApp, run as a subprocess, whose own
  ``AppAPIAuthMiddleware`` checks the identity headers HaRP forwards;
* ``frpc``: the upstream FRP client (installed by ``tools/get-frpc``), configured the way an
  ExApp container's ``start.sh`` configures it;
* ``bulk_upstream``: a plain HTTP upstream that pushes volume and timing through HaRP;
* ``harp``: the process under test itself, ``twistd -n harp``.

Each is a :class:`tests.peers.base.Peer`: ``start()`` returns it running, ``stop()`` ends it,
and a ``with`` block does both.
"""
