"""Liveness that heals: a process paused past its expiry (SIGSTOP, then SIGCONT) is
dropped by the others, and comes back into the mesh by itself, without a restart."""

import os
import signal

from conftest import ShardSubscriber, Subscriber, mesh_yaml, metrics, until_routed, until_sharded, wait_for

EXPIRY_S = 0.25 * 4  # announce_ms × multiplier of mesh_yaml's defaults


def test_a_paused_sidecar_rejoins_after_its_transmitter_dropped_it(start_mesh):
    m = start_mesh(mesh_yaml(name="pause", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    assert a["transmitter"] != b["transmitter"]
    pub = m.redis(a)
    sub = Subscriber(m.redis(b), channels=["heal"])
    until_routed(pub, "heal", 1)
    home = m.transmitter(b["transmitter"])
    os.kill(b["pid"], signal.SIGSTOP)
    try:
        # Messages for it wait in its socket while it sleeps: on waking it reads them
        # first, which used to keep its link looking alive while the transmitter
        # answered every ping "unknown cell".
        for i in range(5):
            pub.publish("heal", b"asleep-%d" % i)
        wait_for(lambda: metrics(home["metrics"])["thynapse_transmitter_cells"] == 0,
                 timeout=10 * EXPIRY_S, what="the paused cell dropped by its transmitter")
    finally:
        os.kill(b["pid"], signal.SIGCONT)
    # Back within two expiries (and some slack for a loaded machine), by itself.
    wait_for(lambda: pub.publish("heal", b"awake") >= 1, timeout=2 * EXPIRY_S + 5,
             interval=0.05, what="the woken cell routed again")
    sub.wait_count(1, prefix=b"awake")
    assert m.cell(b["name"])["pid"] == b["pid"], "restarted instead of healed"


def test_a_paused_transmitter_rejoins_its_peers(start_mesh):
    m = start_mesh(mesh_yaml(name="tpause", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    t0, t1 = m.transmitter(a["transmitter"]), m.transmitter(b["transmitter"])
    assert t0["name"] != t1["name"]
    os.kill(t1["pid"], signal.SIGSTOP)
    try:
        # Its peer forgets it, and its cell moves away.
        wait_for(lambda: metrics(t0["metrics"])["thynapse_transmitter_peers"] == 0,
                 timeout=10 * EXPIRY_S, what="the paused transmitter forgotten by its peer")
        wait_for(lambda: m.refresh() and m.cell(b["name"])["transmitter"] == t0["name"],
                 timeout=10 * EXPIRY_S, what="its cell moved away")
    finally:
        os.kill(t1["pid"], signal.SIGCONT)
    wait_for(lambda: metrics(t0["metrics"])["thynapse_transmitter_peers"] == 1
             and metrics(t1["metrics"])["thynapse_transmitter_peers"] == 1,
             timeout=2 * EXPIRY_S + 5, what="the two linked again")
    # A cell joining the woken transmitter is known to its peer: a restarted sidecar
    # goes back to its planned transmitter.
    m.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(b["pid"], signal.SIGKILL)
    wait_for(lambda: m.refresh() and m.cell(b["name"])["pid"] not in (None, b["pid"])
             and m.cell(b["name"])["transmitter"] == t1["name"], timeout=20,
             what="the cell restarted on the woken transmitter")
    sub = Subscriber(m.redis(m.cell(b["name"])), channels=["woken"])
    until_routed(m.redis(a), "woken", 1, timeout=2 * EXPIRY_S + 5)
    sub.pubsub.close()
    assert m.transmitter(t1["name"])["pid"] == t1["pid"], "restarted instead of healed"


def test_a_paused_sidecars_room_session_rejoins_too(start_mesh):
    """Room sessions heal like the mesh session: paused past the expiry, the sidecar's
    session in a room is dropped by the room's host, and after SIGCONT it is back (its
    shard subscription in place) without a restart."""
    m = start_mesh(mesh_yaml(name="rpause", replicas=2, services=[("s", [])]), cells={"s": 2})
    a, b = m.cells("s")
    pub = m.redis(a)
    sub = ShardSubscriber(m.redis(b), ["{den}x"])
    until_sharded(pub, "{den}x", 1)
    os.kill(b["pid"], signal.SIGSTOP)
    try:
        # Its host drops the room session (and its subscription) as silent.
        wait_for(lambda: pub.spublish("{den}x", b"asleep") == 0, timeout=10 * EXPIRY_S,
                 interval=0.1, what="the paused room session dropped")
    finally:
        os.kill(b["pid"], signal.SIGCONT)
    wait_for(lambda: pub.spublish("{den}x", b"awake") >= 1, timeout=2 * EXPIRY_S + 5,
             interval=0.05, what="the woken room session routed again")
    sub.wait_count(1, prefix=b"awake")
    assert m.cell(b["name"])["pid"] == b["pid"], "restarted instead of healed"
