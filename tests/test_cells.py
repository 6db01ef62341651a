"""Cell → transmitter promises of docs/protocol.md and docs/architecture.md on the wire,
from a raw cell written in Python (`rawwire.RawCell`): WLCM's fields, the HELO and interest
bounds, a PUBS checked whole before any of it is routed, what a cell dropped as silent
sends late, and what happens to messages a cell took without crediting when it leaves."""

import os
import signal

import zmq

from conftest import Subscriber, drops, mesh_yaml, metrics, until_an_expiry_passed, wait_for
from rawwire import RawCell, publish_records

EXPIRY_S = 0.25 * 4  # announce_ms × multiplier of mesh_yaml's defaults


def test_wlcm_fields_and_the_bounds_of_helo_and_of_a_cells_interest(start_mesh, ctx):
    limit = 65536
    extra = f"  limits: {{maxMessageBytes: {limit}}}\n"
    m = start_mesh(mesh_yaml(name="bounds", replicas=1, extra=extra), cells={})
    t = m.transmitter("bounds-0")
    welcome = RawCell(ctx, t["command"]).hello()
    assert welcome == {"id": t["id"], "name": "bounds-0", "pub": t["event"], "max_message_bytes": limit,
                       "heartbeat_ms": 250}, welcome
    # Delivery rules over 64 KiB of patterns: refused, counted.
    rules = [{"pattern": "p%05d" % i + "x" * 1000, "mode": "anycatch"} for i in range(66)]
    answer = RawCell(ctx, t["command"], rules=rules)
    answer.authenticate()
    answer.send("HELO", {"id": answer.id, "service": "raw", "rules": rules})
    _, cmd, body, _ = answer.recv()
    assert cmd == "ERRR" and "HELO refused" in body["error"], (cmd, body)
    assert metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="hello"}'] == 1
    # Interest past 512 KiB of names: the transmitter answers ERRR for the rest and counts it.
    cell = RawCell(ctx, t["command"])
    cell.hello()
    names = ["n%05d" % i + "y" * 16000 for i in range(33)]  # 33 × 16 KiB
    cell.subscribe(names)
    _, cmd, body, _ = cell.recv()
    assert (cmd, body["error"]) == ("ERRR", "1 subscriptions refused: a cell subscribes to at most 524288 bytes of names")
    assert metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="interest_bytes"}'] == 1


def test_a_pubs_is_checked_whole_before_any_of_it_is_routed(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="whole", replicas=1, services=[("s", [])]), cells={"s": 1})
    t = m.transmitter("whole-0")
    sub = Subscriber(m.redis(m.cells("s")[0]), channels=["whole"])
    cell = RawCell(ctx, t["command"])
    cell.hello()
    good = (1).to_bytes(8, "little") + publish_records([("whole", "first")])
    broken = publish_records([("whole", "second")])[:-3]  # a record cut short
    cell.send_binary("PUBS", good, broken)
    _, cmd, body, _ = cell.recv()
    assert cmd == "ERRR", (cmd, body)
    # The same cell's next batch goes through: what arrives is it alone.
    assert cell.publish(7, [("whole", "third")]) == [1]
    sub.wait_count(1)
    sub.poll(timeout=0.3)
    assert sub.data() == [b"third"], "a message of the refused batch was routed"


def test_a_transmitter_does_not_route_what_it_reads_late_from_a_cell_it_dropped(start_mesh, ctx):
    """The transmitter is paused past a cell's expiry while the cell sends an event: on
    waking, the event is not routed (the cell is dropped; it would greet again and send it
    anew), and the cell is told it is unknown."""
    m = start_mesh(mesh_yaml(name="late", replicas=1, services=[("s", [])]), cells={"s": 1})
    t = m.transmitter("late-0")
    sub = Subscriber(m.redis(m.cells("s")[0]), channels=["late"])
    cell = RawCell(ctx, t["command"])
    cell.hello()
    cell.send("EVNT", {"channel": "late", "data": "on time"})
    assert cell.expect("ACKD")[2]["receivers"] == 1
    sub.wait_count(1)
    cell.send("PING")
    cell.expect("PONG")  # alive when the pause starts, so the late read is what drops it
    os.kill(t["pid"], signal.SIGSTOP)
    try:
        cell.send("EVNT", {"channel": "late", "data": "read late"})
        # Paused past the cell's expiry, as a clock outside says.
        until_an_expiry_passed(m, timeout=10 * EXPIRY_S)
    finally:
        os.kill(t["pid"], signal.SIGCONT)
    _, cmd, body, _ = cell.recv()
    assert cmd == "ERRR" and "unknown cell" in body["error"], (cmd, body)
    # Everything after it goes through, and the late event never arrives.
    marker = RawCell(ctx, t["command"])
    marker.hello()
    wait_for(lambda: marker.publish(1, [("late", "after")]) == [1], what="the subscriber routable again")
    sub.wait_count(2)
    assert b"read late" not in sub.data()


def test_messages_a_cell_took_without_crediting_when_it_leaves(start_mesh, ctx):
    """Multicatch: counted `cell_lost` when the cell vanishes, `cell_quit` when it says
    QUIT. Anycatch: given to another cell of the Service when the first says QUIT, and
    counted as a redelivery."""
    # A 5 s expiry: the raw cells do not ping, and must not expire before they leave.
    m = start_mesh(mesh_yaml(name="leave", replicas=1, services=[("s", [])], multiplier=20), cells={"s": 1})
    t = m.transmitter("leave-0")
    pub = m.redis(m.cells("s")[0])
    vanishing, quitting = RawCell(ctx, t["command"]), RawCell(ctx, t["command"])
    for c in (vanishing, quitting):
        c.hello()
        c.subscribe(["mc"], sync=1)
    for i in range(5):
        assert pub.publish("mc", b"m%d" % i) == 2
    for c in (vanishing, quitting):
        assert [d["payload"] for d in c.read_deliveries(5)] == [b"m%d" % i for i in range(5)]
    before = drops(t["metrics"])
    quitting.send("QUIT")
    wait_for(lambda: drops(t["metrics"])["cell_quit"] - before["cell_quit"] == 5, what="5 counted cell_quit")
    vanishing.close()  # no QUIT, no ping: dropped at its expiry
    wait_for(lambda: drops(t["metrics"])["cell_lost"] - before["cell_lost"] == 5, timeout=30,
             what="5 counted cell_lost at its expiry")
    # Anycatch: two cells of one Service; the one that got the message says QUIT first.
    rules = [{"pattern": "job", "mode": "anycatch"}]
    workers = [RawCell(ctx, t["command"], service="w", rules=rules) for _ in range(2)]
    for w in workers:
        w.hello()
        w.subscribe(["job"], sync=1)
    redelivered = lambda: metrics(t["metrics"])["thynapse_transmitter_anycatch_redelivered_total"]  # noqa: E731
    first = redelivered()
    assert pub.publish("job", b"work") == 1

    def taker():
        for w in workers:
            try:
                w.sock.setsockopt(zmq.RCVTIMEO, 50)
                w.read_deliveries(1, timeout=0.2)
                return w
            except AssertionError:
                continue
        return None

    took = wait_for(taker, what="one worker took the message")
    other = workers[1 - workers.index(took)]
    took.send("QUIT")
    again = other.read_deliveries(1)[0]
    assert (again["origin"], again["seq"], again["payload"]) == (took.delivered()[0]["origin"], took.delivered()[0]["seq"], b"work")
    assert redelivered() == first + 1
    other.credit()


def test_a_cell_that_never_reads_its_replies_is_disconnected_and_holds_up_no_one(start_mesh, ctx):
    """A million PINGs, no PONG read: once its send queue is full the cell is disconnected
    and counted, instead of holding up the transmitter's loop (and every other cell) while
    it waits for room. That is what it did before."""
    m = start_mesh(mesh_yaml(name="noread", replicas=1, services=[("s", [])], multiplier=20), cells={"s": 1})
    t = m.transmitter("noread-0")
    sub = Subscriber(m.redis(m.cells("s")[0]), channels=["alive"])
    flood = RawCell(ctx, t["command"])
    flood.sock.setsockopt(zmq.RCVHWM, 1)
    flood.sock.setsockopt(zmq.RCVBUF, 4096)
    flood.hello()
    for _ in range(1_500_000):
        flood.sock.send(b"J PING {}")
    wait_for(lambda: metrics(t["metrics"])['thynapse_transmitter_refused_total{limit="send_queue"}'] >= 1,
             timeout=30, what="the reader that never reads disconnected")
    other = RawCell(ctx, t["command"])
    other.hello()
    assert other.publish(1, [("alive", "yes")]) == [1]
    sub.wait_count(1)
