"""A mesh of sixty transmitters on this machine (issue 18): it comes up, routes between
cells on transmitters far apart both ways, and survives a `kill -9` of one of them, its
cell moving as in a small mesh. How idle cost grows with N is bench/scaling.py's to show,
not a test's."""

import os
import signal

from conftest import Subscriber, drops, mesh_yaml, until_routed, wait_for
from rawwire import RawCell

N = 60


def test_sixty_transmitters_route_far_apart_and_survive_a_kill_9(start_mesh, ctx):
    m = start_mesh(mesh_yaml(name="big", replicas=N, services=[("s", [])]), cells={"s": 2})
    near, moving = m.cells("s")
    assert (near["transmitter"], moving["transmitter"]) == ("big-0", "big-1")
    # A cell on the last transmitter, written from the protocol: as far as it gets.
    last = m.transmitter(f"big-{N - 1}")
    far = RawCell(ctx, last["command"], service="s")
    far.hello()
    far.subscribe(["to.far"], sync=1)  # answered once all 59 peers know it
    near_client = m.redis(near)
    assert near_client.publish("to.far", b"hello far") == 1
    assert [d["payload"] for d in far.read_deliveries(1)] == [b"hello far"]
    # The other way, to a stock Redis subscriber on the first transmitter.
    at_near = Subscriber(m.redis(near), channels=["to.near"])
    wait_for(lambda: far.publish(1, [("to.near", b"probe")]) == [1], what="to.near routed from the far cell")
    at_near.wait_count(1)

    # kill -9 of big-1: its cell moves to another transmitter and is reached again there.
    victim = m.transmitter("big-1")
    point = m.endpoints["rendezvous"][0]["metrics"]
    answers_before = drops(point, "thynapse_rendezvous_membership_answers_total", label="kind")
    at_moving = Subscriber(m.redis(moving), channels=["to.moving"])
    until_routed(near_client, "to.moving", 1)
    m.allow_restarts = True  # killed on purpose: `up` restarts it
    os.kill(victim["pid"], signal.SIGKILL)
    seq = [2]

    def reached():
        seq[0] += 1
        far.publish(seq[0], [("to.moving", b"after %d" % seq[0])])
        at_moving.poll(timeout=0.05)
        return bool(at_moving.data(b"after"))

    # Within the bound the small-mesh test allows (test_failover: 20 s).
    wait_for(reached, timeout=20, interval=0.1, what="the cell of the killed transmitter reached again")
    # Peers that had nothing waiting on big-1 noticed it too, from its closed links, not
    # after the rendezvous stopped listing it (an expiry and more later).
    idle = m.transmitter(f"big-{N // 2}")

    def forgotten():
        return drops(idle["metrics"], "thynapse_transmitter_peers_forgotten_total")

    wait_for(lambda: forgotten()["closed"] >= 1, what=f"big-{N // 2} forgetting the killed big-1")
    assert forgotten()["unlisted"] == 0 and forgotten()["silent"] == 0, forgotten()
    # The rest of the mesh did not lose its way meanwhile: far to near still routes.
    before = len(at_near.data())
    assert far.publish(seq[0] + 1, [("to.near", b"still")]) == [1]
    at_near.wait_count(before + 1)

    # The rendezvous told the others what changed (big-1 gone, then back as a new
    # instance), not the whole mesh of sixty again to each of them.
    answers = drops(point, "thynapse_rendezvous_membership_answers_total", label="kind")
    assert answers["changed"] - answers_before["changed"] >= N - 2, (answers_before, answers)
    assert answers["full"] - answers_before["full"] <= 2, (answers_before, answers)

    # Ctrl-C in a terminal signals the whole group at once: sixty transmitters drain at
    # the same moment, each saying `LINKED` as its peers leave, and `up` still reaps
    # every child and exits (it once stopped reading their reports, and hung).
    os.killpg(m.proc.pid, signal.SIGTERM)
    wait_for(lambda: m.proc.poll() is not None, timeout=30, what="thynapse up exiting on Ctrl-C")
    assert m.proc.returncode == 0, (m.dir / "up.log").read_text()[-2000:]
