#!/usr/bin/env python3
"""redis-py (sync) through the client-matrix scenario of tests/test_clients.py."""

import time

import redis

from scenario import N, Scenario, fail, say

CONFIRMATIONS = {"subscribe", "psubscribe", "ssubscribe"}


def main():
    s = Scenario()
    kw = {"protocol": s.protocol} if s.protocol else {}
    sub = redis.Redis(host=s.sub[0], port=s.sub[1], **kw)
    pub = redis.Redis(host=s.pub[0], port=s.pub[1], **kw)
    if sub.ping() is not True or pub.ping() is not True:
        fail("PING")

    ps = sub.pubsub()
    ps.subscribe(s.ch)
    ps.psubscribe(s.pat)
    ps.ssubscribe(s.sh)
    confirmed = set()
    deadline = time.monotonic() + 10
    while confirmed != CONFIRMATIONS:
        if time.monotonic() > deadline:
            fail(f"confirmations: only {sorted(confirmed)}")
        m = ps.get_message(timeout=0.1)
        if m:
            if m["type"] not in CONFIRMATIONS:
                fail(f"before the confirmations: {m}")
            confirmed.add(m["type"])

    def drain(timeout):
        m = ps.get_message(timeout=timeout)
        if m and m["type"] not in CONFIRMATIONS:
            s.received(m["type"], m["channel"], m["pattern"], m["data"])

    for i in range(1, N + 1):
        for command, channel, payload in s.publishes(i):
            n = pub.publish(channel, payload) if command == "PUBLISH" else pub.spublish(channel, payload)
            if n < 1:
                fail(f"{command} {channel} {payload} answered {n}")
    deadline = time.monotonic() + 10
    while not s.phase1_done():
        if time.monotonic() > deadline:
            fail(f"phase 1 timed out, got {s.counts()}")
        drain(0.1)

    s.await_restart()
    deadline = time.monotonic() + 30
    k, next_round = 0, 0.0
    while not s.phase2_done():
        now = time.monotonic()
        if now > deadline:
            fail(f"phase 2 timed out, got {s.counts()}")
        if now >= next_round:
            k, next_round = k + 1, now + 0.1
            try:
                for command, channel, payload in s.publishes(k):
                    pub.execute_command(command, channel, payload)
            except redis.ConnectionError:
                pass  # the next round retries
        try:
            drain(0.05)
        except redis.ConnectionError:
            pass  # PubSub reconnects and resubscribes on its next read
    say("RECONNECT library")
    say("PHASE2 OK")


if __name__ == "__main__":
    main()
