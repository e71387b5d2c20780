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

Q1 is PUSH/PULL, ZeroMQ's way to spread work: the publisher binds a blocking
PUSH socket and starts once every worker's connection completed its
handshake (a socket monitor tells); each worker connects a ``zmq.asyncio``
PULL socket. PUSH hands each message to the next worker with room, in turn,
and blocks when all are full: nothing is lost. R1 is REQ/REP over
``zmq.asyncio`` on both sides: the responder binds REP, decodes each request
and sends the reply envelope; the requester connects REQ (relaxed and
correlated, so a timed-out request does not wedge the socket).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from shmbus.codec import decode_envelope, encode_envelope

from ...children import AsyncLink, BlockingLink
from ..harness import async_requester, async_subscriber, blocking_publisher
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
        if spec.queue is not None:  # Q1: work for a pool, not a broadcast
            _pusher(link, spec, resources[index])
            return
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

    def group_member(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_puller(link, spec, list(resources)))

    def requester(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_requester(link, spec, resources[index]))

    def responder(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_responder(link, spec, resources[0]))


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


def _pusher(link: BlockingLink, spec: RunSpec, endpoint: str) -> None:
    """Q1's publisher: a PUSH socket the workers' PULL sockets connect to."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    try:
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sock.bind(endpoint)
            _await_handshakes(monitor, spec.subscribers)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
        send_multipart = sock.send_multipart

        def send(topic: str, payload: dict[str, Any]) -> None:
            body = encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE)
            send_multipart([topic.encode(), body])

        blocking_publisher(link, spec, send)
    finally:
        sock.close(linger=0)
        context.term()


def _await_handshakes(monitor: zmq.Socket[bytes], count: int) -> None:
    """Block until *count* connections to the monitored socket completed
    their handshake (so PUSH spreads the work over every worker from the
    first message)."""
    deadline = time.monotonic() + _SUBSCRIBERS_TIMEOUT
    seen = 0
    while seen < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not monitor.poll(int(remaining * 1000)):
            raise TimeoutError(f"only {seen} of {count} workers connected")
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            seen += 1


async def _puller(pipe: BlockingLink, spec: RunSpec, endpoints: list[str]) -> None:
    """Q1's worker: a PULL socket connected to the publisher's PUSH."""
    link = AsyncLink(pipe)
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
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

        await async_subscriber(link, spec, consume, share=True)
    finally:
        link.close()
        sock.close(linger=0)
        context.term()


async def _requester(pipe: BlockingLink, spec: RunSpec, endpoint: str) -> None:
    link = AsyncLink(pipe)
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.REQ)
    try:
        # A request that timed out leaves REQ waiting for its reply; relaxed
        # and correlated, the next send is allowed and a late reply dropped.
        sock.setsockopt(zmq.REQ_RELAXED, 1)
        sock.setsockopt(zmq.REQ_CORRELATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.connect(endpoint)
        send_multipart, recv_multipart = sock.send_multipart, sock.recv_multipart

        async def ask(topic: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
            await send_multipart(
                [topic.encode(), encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE)]
            )
            raw_topic, body = await asyncio.wait_for(recv_multipart(), timeout)
            answer: dict[str, Any] = decode_envelope(
                raw_topic.decode(), body, MAX_EVENT_SIZE
            ).payload
            return answer

        await async_requester(link, spec, ask)
    finally:
        link.close()
        sock.close(linger=0)
        context.term()


async def _responder(pipe: BlockingLink, spec: RunSpec, endpoint: str) -> None:
    link = AsyncLink(pipe)
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.REP)
    try:
        sock.bind(endpoint)
        send_multipart, recv_multipart = sock.send_multipart, sock.recv_multipart

        async def consume(record: Recorder) -> None:
            while True:
                raw_topic, body = await recv_multipart()
                event = decode_envelope(raw_topic.decode(), body, MAX_EVENT_SIZE)
                record(event)
                reply = encode_envelope(event.topic, event.payload, EVENT_TYPE, MAX_EVENT_SIZE)
                await send_multipart([raw_topic, reply])

        await async_subscriber(link, spec, consume)
    finally:
        link.close()
        sock.close(linger=0)
        context.term()


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
