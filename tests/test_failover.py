"""Failures: a transmitter killed or drained, the rendezvous restarted, `up` stopped."""

import os
import signal
import subprocess

from conftest import Subscriber, every_one_from_its_first, free_udp_query, mesh_yaml, metrics, until_routed, wait_for

SERVICES = [("s", [])]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_transmitter_cells_move_and_others_see_no_gap(start_mesh):
    """What a SIGKILL of a transmitter costs, message by message: cells elsewhere get
    everything, once, in order; the moved cells get what was published before the kill or
    it is counted (`peer_lost` at the publisher's transmitter), and after the kill every
    message from the first they get again on, once, in order."""
    mesh = start_mesh(mesh_yaml(replicas=3, services=SERVICES), cells={"s": 3})
    victim = mesh.transmitter("demo-0")
    moved = [c for c in mesh.cells() if c["transmitter"] == "demo-0"]
    stayed = [c for c in mesh.cells() if c["transmitter"] != "demo-0"]
    assert moved and len(stayed) >= 2
    publisher = mesh.redis(stayed[0])
    home = mesh.transmitter(stayed[0]["transmitter"])
    watcher = Subscriber(mesh.redis(stayed[1]), channels=["beat"])
    victims = [Subscriber(mesh.redis(c), channels=["beat"]) for c in moved]
    until_routed(publisher, "beat", len(moved) + 1)
    # Acknowledged just before the kill: delivered, or counted.
    before = [b"p:%d" % i for i in range(200)]
    pipe = publisher.pipeline(transaction=False)
    for payload in before:
        pipe.publish("beat", payload)
    assert pipe.execute() == [len(moved) + 1] * len(before)
    mesh.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(victim["pid"], signal.SIGKILL)
    # Keep publishing through the failure until every moved cell receives again.
    sent = []

    def resumed():
        payload = b"b:%d" % len(sent)
        publisher.publish("beat", payload)
        sent.append(payload)
        for v in victims:
            v.poll(timeout=0)
        return len(sent) > 20 and all(v.data(b"b:") for v in victims)

    wait_for(resumed, timeout=20, interval=0.05, what="pub/sub resumed on moved cells")
    tail = [b"b:%d" % i for i in range(len(sent), len(sent) + 50)]
    for payload in tail:
        assert publisher.publish("beat", payload) == len(moved) + 1
    sent += tail
    watcher.wait_count(len(before), prefix=b"p:")
    watcher.wait_count(len(sent), prefix=b"b:")
    assert watcher.data(b"p:") == before and watcher.data(b"b:") == sent, "no gap, no copy for cells elsewhere"
    for v in victims:
        v.wait_count(len(tail), prefix=b"b:")
        assert every_one_from_its_first(v, sent, b"b:") <= len(sent) - len(tail)
    missed = sum(len(set(before) - set(v.data(b"p:"))) for v in victims)
    counted = metrics(home["metrics"])['thynapse_transmitter_drops_total{reason="peer_lost"}']
    assert missed <= counted, f"{missed} acknowledged messages neither delivered nor counted ({counted})"
    for v in victims:
        got = v.data(b"p:")
        assert len(got) == len(set(got)) and got == sorted(got, key=lambda p: int(p[2:])), "once, in order"


def test_sigterm_transmitter_loses_nothing(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=3, services=SERVICES), cells={"s": 3})
    on_victim = [c for c in mesh.cells() if c["transmitter"] == "demo-1"]
    others = [c for c in mesh.cells() if c["transmitter"] != "demo-1"]
    subs = [Subscriber(mesh.redis(c), channels=["orders"]) for c in mesh.cells()]
    # One publisher on the draining transmitter, one elsewhere.
    publishers = [mesh.redis(on_victim[0]), mesh.redis(others[0])]
    for p in publishers:
        until_routed(p, "orders", 3)
    mesh.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(mesh.transmitter("demo-1")["pid"], signal.SIGTERM)
    sent = []
    # Publish through the drain, until the drained transmitter has exited.
    def drained():
        for p in publishers:
            payload = b"o:%d" % len(sent)
            p.publish("orders", payload)
            sent.append(payload)
        return len(sent) > 200 and not pid_alive(mesh.transmitter("demo-1")["pid"])
    wait_for(drained, timeout=30, interval=0.01, what="drained transmitter exit")
    for s in subs:
        s.wait_count(len(sent), prefix=b"o:", timeout=30)
        got = s.data(b"o:")
        assert sorted(got) == sorted(sent), "every accepted message delivered, once"


def test_rendezvous_restart_relearns_everything(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=3, services=SERVICES), cells={"s": 2})
    rv = mesh.endpoints["rendezvous"][0]
    sub = Subscriber(mesh.redis(mesh.cell("s-0")), channels=["rv"])
    publisher = mesh.redis(mesh.cell("s-1"))
    until_routed(publisher, "rv", 1)
    mesh.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(rv["pid"], signal.SIGKILL)
    # Delivery goes on while the rendezvous is down.
    for i in range(50):
        publisher.publish("rv", b"r:%d" % i)
    sub.wait_count(50, prefix=b"r:")
    # `up` restarts it on the same address; announcements rebuild its directory.
    def relearned():
        ep = mesh.refresh()
        if ep["rendezvous"][0]["pid"] in (None, rv["pid"]):
            return False
        reply = free_udp_query(rv["address"], "demo")
        return sorted(t["name"] for t in reply["transmitters"]) == ["demo-0", "demo-1", "demo-2"]
    wait_for(relearned, timeout=20, what="rendezvous relearned every transmitter")
    publisher.publish("rv", b"r:after")
    sub.wait_count(1, prefix=b"r:after")


def test_sigterm_to_up_stops_every_child(start_mesh):
    mesh = start_mesh(mesh_yaml(replicas=2, services=SERVICES), cells={"s": 2})
    ep = mesh.endpoints
    pids = [x["pid"] for x in ep["rendezvous"] + ep["transmitters"] + ep["cells"]]
    assert len(pids) == 5 and all(pid_alive(p) for p in pids)
    mesh.proc.send_signal(signal.SIGTERM)
    assert mesh.proc.wait(timeout=20) == 0
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="children gone")
    assert subprocess.run(["pgrep", "-P", str(mesh.proc.pid)], capture_output=True).stdout == b""


def test_a_stopped_peer_holds_a_subscription_confirmation_one_expiry_at_most(start_mesh):
    """A SUBSCRIBE confirmation waits for every live transmitter; one that stops answering
    (SIGSTOP) holds it for about one expiry, not for ever, and the confirmation given
    without its answer is counted."""
    mesh = start_mesh(mesh_yaml(replicas=3, services=[("a", []), ("b", [])]), cells={"a": 1, "b": 1})
    sub_cell, pub_cell = mesh.cell("a-0"), mesh.cell("b-0")
    spare = next(t for t in mesh.endpoints["transmitters"] if t["name"] not in (sub_cell["transmitter"], pub_cell["transmitter"]))
    home = mesh.transmitter(sub_cell["transmitter"])
    sub = mesh.redis(sub_cell).pubsub()
    publisher = mesh.redis(pub_cell)
    os.kill(spare["pid"], signal.SIGSTOP)
    try:
        sub.subscribe("held")
        confirmation = sub.get_message(timeout=20)
        assert confirmation and confirmation["type"] == "subscribe", confirmation
        m = metrics(home["metrics"])
        gave_up = sum(m[f'thynapse_transmitter_interest_sync_gave_up_total{{reason="{r}"}}'] for r in ("timeout", "peer_lost"))
        assert gave_up >= 1, "the confirmation went out without the stopped peer's answer: counted"
        # The transmitters that answer knew it: a publish from the other one reaches it.
        assert publisher.publish("held", b"x") == 1
        assert sub.get_message(timeout=10)["data"] == b"x"
    finally:
        os.kill(spare["pid"], signal.SIGCONT)
