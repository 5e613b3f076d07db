"""FRP server side of HaRP: the protocol layers that stock ``frpc`` clients speak.

The modules in this package are split by concern so each can be tested without a
network, and so the Twisted wiring (``server.py``/``control.py``) stays thin:

* :mod:`harp.frp.sniff`  -- classify the first byte of a connection (custom TLS
  byte ``0x17``, TLS ClientHello ``0x16``, plain) and then the first byte of the
  plaintext (yamux session vs. direct message channel).
* :mod:`harp.frp.msg`    -- FRP message framing (type byte, int64 length, JSON
  body) and the message dataclasses.
* :mod:`harp.frp.crypto` -- token-derived key and the AES-128-CFB stream cipher
  that protects the control channel (and optionally work connections).
* :mod:`harp.frp.yamux`  -- the yamux frame codec and a sans-I/O session state
  machine with per-stream flow control.

None of these four modules performs I/O, owns a socket, or touches the reactor;
they take bytes in and give bytes and events out.  The Twisted side builds on them:

* :mod:`harp.frp.channel` -- a control/work connection as a Twisted transport
  (a yamux stream or a whole TCP connection), with flow control both ways.
* :mod:`harp.frp.mux`     -- a yamux session driven over a transport (keepalive,
  dead-peer detection, login deadline).
* :mod:`harp.frp.control` -- logins, proxies, work-connection pools, cleanup.
* :mod:`harp.frp.tunnels` -- ``TunnelRegistry``: tunnel ports on 127.0.0.1 and the
  in-process endpoints the HTTP side uses.
* :mod:`harp.frp.server`  -- ``FrpServerFactory``: first-byte sniffing, mutual TLS.
* :mod:`harp.frp.backlog` -- ``OutputGuard``: stop reading a peer that does not read.

The wire contract they follow is the FRP protocol spec (frpc 0.61.1 - 0.65.0), cited as
"spec §N" throughout.
"""
