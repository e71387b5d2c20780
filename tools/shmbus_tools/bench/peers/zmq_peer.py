"""ZeroMQ PUB/SUB over ``ipc://``: pyzmq, blocking publisher, asyncio subscriber.

Each publisher binds its own ``ipc://`` endpoint with an XPUB socket (PUB
semantics: a message for a subscriber whose high-water mark is reached is
dropped; XPUB only lets the publisher see the subscriptions arrive, so it
starts once every subscriber is connected) and sends two frames, the topic and
the shmbus msgpack envelope, with ``send_multipart``. Subscribers connect a
``zmq.asyncio`` SUB socket to every publisher, filter on the prefix
``decky.``, match the rest of the pattern with the shmbus matcher and decode
each envelope into a :class:`shmbus.Event`. Socket options are the defaults
(high-water marks of 1000 messages) except a 10 ms reconnect interval, so a
subscriber started before its publisher binds connects promptly.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import zmq
import zmq.asyncio

from shmbus.codec import decode_envelope, encode_envelope

from ...children import AsyncLink, BlockingLink
from ..harness import async_subscriber, blocking_publisher
from ..spec import RunSpec
from ..workload import EVENT_TYPE, MAX_EVENT_SIZE, ZMQ_PREFIX, Recorder, make_matcher
from . import Driver

__all__ = ["DRIVERS", "ZmqDriver"]

_SUBSCRIBERS_TIMEOUT = 20.0


class ZmqDriver(Driver):
    name = "zmq"

    def prepare(self, spec: RunSpec) -> list[str]:
        return [
            f"ipc://{self.env.tmpdir}/zmq-{spec.run_id}-{i}.ipc" for i in range(spec.publishers)
        ]

    def release(self, spec: RunSpec, resources: Any) -> None:
        for endpoint in resources:
            try:
                os.unlink(endpoint.removeprefix("ipc://"))
            except FileNotFoundError:
                pass

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.bind(resources[index])
            _await_subscribers(sock, spec.subscribers)
            send_multipart = sock.send_multipart

            def send(topic: str, payload: dict[str, Any]) -> None:
                body = encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE)
                send_multipart([topic.encode(), body])

            blocking_publisher(link, spec, send)
        finally:
            sock.close(linger=0)
            context.term()

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_subscriber(link, spec, list(resources)))


def _await_subscribers(sock: zmq.Socket[bytes], count: int) -> None:
    """Block until *count* subscriptions reached the XPUB socket."""
    deadline = time.monotonic() + _SUBSCRIBERS_TIMEOUT
    seen = 0
    while seen < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(int(remaining * 1000)):
            raise TimeoutError(f"only {seen} of {count} subscribers connected")
        if sock.recv()[:1] == b"\x01":
            seen += 1


async def _subscriber(pipe: BlockingLink, spec: RunSpec, endpoints: list[str]) -> None:
    link = AsyncLink(pipe)
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.setsockopt(zmq.SUBSCRIBE, ZMQ_PREFIX)
        for endpoint in endpoints:
            sock.connect(endpoint)
        matcher = make_matcher()

        async def consume(record: Recorder) -> None:
            recv_multipart = sock.recv_multipart
            while True:
                raw_topic, body = await recv_multipart()
                topic = raw_topic.decode()
                if matcher(topic):
                    record(decode_envelope(topic, body, MAX_EVENT_SIZE))

        await async_subscriber(link, spec, consume)
    finally:
        link.close()
        sock.close(linger=0)
        context.term()


DRIVERS: dict[str, type[Driver]] = {"zmq": ZmqDriver}
