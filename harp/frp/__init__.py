"""FRP server side of HaRP: the protocol layers that stock ``frpc`` clients speak.

The modules are named as frp names them (``pkg/msg``, ``server/service.go``,
``server/control.go``) and split by concern, so each can be tested without a network
and the Twisted wiring stays thin.  Pure codecs, no I/O, no reactor -- bytes in, bytes
and events out:

* :mod:`harp.frp.sniff`       -- classify the first byte of a connection (custom TLS
  byte ``0x17``, TLS ClientHello ``0x16``, plain) and then the first byte of the
  plaintext (yamux session vs. direct message stream).
* :mod:`harp.frp.gojson`      -- Go ``encoding/json`` with ``omitempty``, in miniature.
* :mod:`harp.frp.msg`         -- the message structs and frp's type table.
* :mod:`harp.frp.codec`       -- message framing (type byte, int64 length, JSON body).
* :mod:`harp.frp.crypto`      -- token-derived key and the AES-128-CFB stream cipher
  that protects the control stream (and optionally work connections).
* :mod:`harp.frp.yamux_frame` -- the yamux frame header, types, flags and builders.
* :mod:`harp.frp.yamux`       -- the yamux session state machine with per-stream flow
  control.

The Twisted side builds on them (each arrow points down this list's imports only):

* :mod:`harp.frp.backlog`  -- ``OutputGuard``: stop reading a peer that does not read.
* :mod:`harp.frp.stream`   -- ``Stream``: a control/work connection as a Twisted
  transport (a yamux stream or a whole TCP connection), flow control both ways.
* :mod:`harp.frp.mux`      -- a yamux session driven over a transport (keepalive,
  dead-peer detection, login deadline); its streams are ``YamuxStream``.
* :mod:`harp.frp.tunnels`  -- ``TunnelRegistry``: tunnel ports on 127.0.0.1 and the
  in-process endpoints the HTTP side uses.
* :mod:`harp.frp.control`  -- ``Control``: one logged-in client (proxies, work
  connection pool, heartbeat, cleanup).
* :mod:`harp.frp.service`  -- ``FrpServer`` (logins, work-connection routing, the
  run_id table) and ``FrpService`` (listener, then controls, then tunnels on stop).
* :mod:`harp.frp.listener` -- ``FrpServerFactory``: first-byte sniffing, mutual TLS
  (``FrpTLSContext``), yamux or direct streams handed to the ``FrpServer``.

The wire contract they follow (frpc 0.61.1 - 0.65.0) is summarised in
docs/compatibility.md#frp-protocol, whose subsections the modules cite.
"""
