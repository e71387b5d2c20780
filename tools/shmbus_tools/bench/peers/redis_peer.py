"""Redis pub/sub: a real ``redis-server`` on 127.0.0.1 and redis-py's asyncio client.

Runs only where ``redis-server`` is installed (Debian package
``redis-server``) and the ``redis`` client is importable; otherwise the
benchmark reports the peer as skipped. Publishers ``await
r.publish(channel, envelope)`` (one round trip each: PUBLISH answers with the
receiver count); subscribers ``PSUBSCRIBE decky.*.traffic``, consume ``async
for message in pubsub.listen()`` and decode each envelope into a
:class:`shmbus.Event`. Server and client settings are the defaults (no
persistence).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio
import redis.exceptions

from shmbus.codec import decode_envelope, encode_envelope

from ...children import AsyncLink, BlockingLink
from ...servers import redis_server_binary
from ..harness import async_publisher, async_subscriber
from ..spec import RunSpec
from ..workload import EVENT_TYPE, MAX_EVENT_SIZE, PATTERN, Recorder
from . import Driver

__all__ = ["DRIVERS", "RedisDriver"]

_READY_TIMEOUT = 10.0


class RedisDriver(Driver):
    name = "redis"
    server = "redis"

    @classmethod
    def unavailable(cls) -> str | None:
        if redis_server_binary() is None:
            return "redis-server is not installed (Debian package redis-server)"
        return None

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.redis_url is not None
        asyncio.run(_publisher(link, spec, self.env.redis_url))

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        assert self.env.redis_url is not None
        asyncio.run(_subscriber(link, spec, self.env.redis_url))


async def _publisher(pipe: BlockingLink, spec: RunSpec, url: str) -> None:
    link = AsyncLink(pipe)
    client = redis.asyncio.Redis.from_url(url)
    try:
        publish = client.publish

        async def send(topic: str, payload: dict[str, Any]) -> None:
            await publish(topic, encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE))

        await async_publisher(link, spec, send)
    finally:
        link.close()
        await client.aclose()


async def _subscriber(pipe: BlockingLink, spec: RunSpec, url: str) -> None:
    link = AsyncLink(pipe)
    client = redis.asyncio.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        await pubsub.psubscribe(PATTERN)
        confirmed = await pubsub.get_message(timeout=_READY_TIMEOUT)
        if not confirmed or confirmed.get("type") != "psubscribe":
            raise RuntimeError(f"no PSUBSCRIBE confirmation from redis: {confirmed!r}")

        async def consume(record: Recorder) -> None:
            try:
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        topic = message["channel"].decode()
                        record(decode_envelope(topic, message["data"], MAX_EVENT_SIZE))
            except redis.exceptions.ConnectionError:
                # Redis cuts off a subscriber whose output buffer outgrows
                # client-output-buffer-limit (pubsub): that is its loss policy.
                record.end_note = "disconnected by the server"

        await async_subscriber(link, spec, consume)
    finally:
        link.close()
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await client.aclose()
        except redis.exceptions.RedisError:
            pass  # the server already hung up


DRIVERS: dict[str, type[Driver]] = {"redis": RedisDriver}
