#!/usr/bin/env python3
"""redis-py (asyncio) through the client-matrix scenario of tests/test_clients.py.

redis.asyncio's PubSub has no ssubscribe(): SSUBSCRIBE goes through its execute_command, and
its on_connect resubscribes channels and patterns only, so the program sends SSUBSCRIBE again
when it sees the library's resubscription (or a connection error) after a restart.
"""

import asyncio
import time

import redis.asyncio as redis
from redis.exceptions import ConnectionError

from scenario import N, Scenario, fail, say

CONFIRMATIONS = {"subscribe", "psubscribe", "ssubscribe"}


async def main():
    s = Scenario()
    kw = {"protocol": s.protocol} if s.protocol else {}
    sub = redis.Redis(host=s.sub[0], port=s.sub[1], **kw)
    pub = redis.Redis(host=s.pub[0], port=s.pub[1], **kw)
    if await sub.ping() is not True or await pub.ping() is not True:
        fail("PING")

    ps = sub.pubsub()
    await ps.subscribe(s.ch)
    await ps.psubscribe(s.pat)
    await ps.execute_command("SSUBSCRIBE", s.sh)
    confirmed = set()
    deadline = time.monotonic() + 10
    while confirmed != CONFIRMATIONS:
        if time.monotonic() > deadline:
            fail(f"confirmations: only {sorted(confirmed)}")
        m = await ps.get_message(timeout=0.1)
        if m:
            if m["type"] not in CONFIRMATIONS:
                fail(f"before the confirmations: {m}")
            confirmed.add(m["type"])

    async def drain(timeout):
        """Returns True when the library has resubscribed on a new connection."""
        m = await ps.get_message(timeout=timeout)
        if m and m["type"] not in CONFIRMATIONS:
            s.received(m["type"], m["channel"], m.get("pattern"), m["data"])
        return bool(m) and m["type"] == "subscribe"

    for i in range(1, N + 1):
        for command, channel, payload in s.publishes(i):
            n = await pub.execute_command(command, channel, payload)
            if n < 1:
                fail(f"{command} {channel} {payload} answered {n}")
    deadline = time.monotonic() + 10
    while not s.phase1_done():
        if time.monotonic() > deadline:
            fail(f"phase 1 timed out, got {s.counts()}")
        await drain(0.1)

    s.await_restart()
    deadline = time.monotonic() + 30
    k, next_round, resend = 0, 0.0, False
    while not s.phase2_done():
        now = time.monotonic()
        if now > deadline:
            fail(f"phase 2 timed out, got {s.counts()}")
        if now >= next_round:
            k, next_round = k + 1, now + 0.1
            try:
                for command, channel, payload in s.publishes(k):
                    await pub.execute_command(command, channel, payload)
            except ConnectionError:
                pass  # the next round retries
        try:
            if resend:
                await ps.execute_command("SSUBSCRIBE", s.sh)
                resend = False
            resend = await drain(0.05)
        except ConnectionError:
            resend = True
    say("RECONNECT library+app")
    say("PHASE2 OK")
    await sub.aclose()
    await pub.aclose()


if __name__ == "__main__":
    asyncio.run(main())
