"""BodyPipe: the streamed request body between client and upstream."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.iweb import UNKNOWN_LENGTH

from harp.web.body import WINDOW, BodyPipe, BodyTooLarge


class Flow:
    def __init__(self) -> None:
        self.paused = False
        self.events: list[str] = []

    def pause_client(self) -> None:
        assert not self.paused
        self.paused = True
        self.events.append("pause")

    def resume_client(self) -> None:
        assert self.paused
        self.paused = False
        self.events.append("resume")


class Consumer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def test_buffers_until_started_then_streams() -> None:
    flow = Flow()
    pipe = BodyPipe(flow, 10)
    assert pipe.length == 10
    pipe.write(b"hello")
    consumer = Consumer()
    done = pipe.startProducing(consumer)  # type: ignore[arg-type]
    assert consumer.data == b"hello" and not done.called
    pipe.write(b"world")
    pipe.finish()
    assert consumer.data == b"helloworld" and done.called


def test_unknown_length_for_chunked() -> None:
    assert BodyPipe(Flow(), None).length == UNKNOWN_LENGTH


def test_window_pauses_client_and_upstream_pause_propagates() -> None:
    flow = Flow()
    pipe = BodyPipe(flow, None)
    pipe.write(b"x" * WINDOW)
    assert flow.paused
    consumer = Consumer()
    pipe.startProducing(consumer)  # type: ignore[arg-type]
    assert not flow.paused and len(consumer.data) == WINDOW
    pipe.pauseProducing()  # upstream socket full
    assert flow.paused
    pipe.write(b"y" * 10)  # in flight: buffered, not written
    assert len(consumer.data) == WINDOW
    pipe.resumeProducing()
    assert not flow.paused and consumer.data.endswith(b"y" * 10)


def test_stop_producing_discards_and_never_fires() -> None:
    flow = Flow()
    pipe = BodyPipe(flow, None)
    pipe.write(b"x" * WINDOW)
    consumer = Consumer()
    done = pipe.startProducing(consumer)  # type: ignore[arg-type]
    pipe.pauseProducing()
    pipe.stopProducing()
    assert not flow.paused
    pipe.write(b"more")
    pipe.finish()
    assert not done.called and len(consumer.data) == WINDOW


def test_collect() -> None:
    pipe = BodyPipe(Flow(), None)
    pipe.write(b'{"a":')
    got = pipe.collect(100)
    pipe.write(b"1}")
    pipe.finish()
    assert got.result == b'{"a":1}'
    big = BodyPipe(Flow(), None)
    failed = big.collect(3)
    big.write(b"12345")
    assert failed.called
    failed.addErrback(lambda f: f.trap(BodyTooLarge))


@given(st.lists(st.binary(max_size=WINDOW), max_size=8), st.integers(0, 8), st.booleans())
def test_order_and_completeness(chunks: list[bytes], start_at: int, pause: bool) -> None:
    flow = Flow()
    pipe = BodyPipe(flow, None)
    consumer = Consumer()
    done = None
    for index, chunk in enumerate(chunks):
        if index == start_at:
            done = pipe.startProducing(consumer)  # type: ignore[arg-type]
            if pause:
                pipe.pauseProducing()
        pipe.write(chunk)
    if done is None:
        done = pipe.startProducing(consumer)  # type: ignore[arg-type]
    pipe.finish()
    pipe.resumeProducing()
    assert bytes(consumer.data) == b"".join(chunks)
    assert done.called and not flow.paused


def test_body_complete_before_upstream_ready_still_returns_a_deferred() -> None:
    """Cold pool: the whole small body arrived before the upstream connection existed.

    ``startProducing`` must hand the Agent a fired Deferred, not None (which made the
    Agent fail with AttributeError and the client get a 502).
    """
    pipe = BodyPipe(Flow(), 5)
    pipe.write(b"hello")
    pipe.finish()
    consumer = Consumer()
    done = pipe.startProducing(consumer)  # type: ignore[arg-type]
    assert done is not None and done.called
    assert consumer.data == b"hello"
