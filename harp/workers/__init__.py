"""``HP_WORKERS`` > 1: one primary process and N serving worker processes.

* :mod:`~harp.workers.primary` -- the primary (the twistd process): authoritative state,
  FRP server, listening sockets, spawning and restarting the workers; the design and its
  choices are described there;
* :mod:`~harp.workers.worker` -- a worker: the ExApp frontends over a mirrored state;
* :mod:`~harp.workers.mirror` -- the worker's :class:`~harp.state.State`;
* :mod:`~harp.workers.commands` -- the AMP commands between them.

``HP_WORKERS=1`` uses none of this: one process, as before.
"""
