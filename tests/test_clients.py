"""Every popular Redis client works with its default options: one scenario, run by a small
program per client library (tests/clients/), against a mesh whose subscriber cell is killed
and restarted half-way.

THE SCENARIO (every program under tests/clients/ follows it exactly)

argv: <sub host:port> <pub host:port> <tag> [resp2|resp3]
    The optional last argument forces that protocol; without it the library's default is used.
    CH = t.<tag>.ch, PAT = t.<tag>.p* (published on PX = t.<tag>.px), SH = {t<tag>}sh.
Output: one line per step on stdout, flushed; input: the line `go` on stdin.

1. Connect a subscriber connection to <sub> and a publisher connection to <pub>, with the
   library's default options (host and port only). PING both and check the answer.
2. On the subscriber: SUBSCRIBE CH, PSUBSCRIBE PAT, SSUBSCRIBE SH, and wait until the library
   reports each confirmation as arrived (not merely sent).
3. At once, from the publisher, for i in 1..=20: PUBLISH CH c<i>, PUBLISH PX p<i>,
   SPUBLISH SH s<i>; each reply must be >= 1. Collect on the subscriber until all 60 arrived,
   deadline 10 s: each exactly once, of the right kind (message on CH, pmessage with pattern
   PAT on PX, smessage on SH), in order per subscription. Print `PHASE1 OK`.
4. Print `KILL` and wait for the line `go` on stdin. (Meanwhile the test kill -9s the
   subscriber cell's sidecar; `thynapse up` restarts it on the same port.)
5. Every 100 ms, deadline 30 s: PUBLISH CH after<k>, PUBLISH PX after<k>, SPUBLISH SH
   after<k> (k = 1, 2, ...; a publish error the library raises is retried by the next round),
   until the subscriber got at least one after... message on each subscription, and nothing
   but after... messages of the right kind. The library's own reconnection and
   resubscription restore the subscriber where it has them. Print one of
       `RECONNECT library`      the library reconnected and resubscribed everything;
       `RECONNECT app`          the program reconnected and resubscribed itself;
       `RECONNECT library+app`  the library did, but the program resubscribed what the
                                library does not track;
   then `PHASE2 OK`, and exit 0.
Any failure: print `FAIL <why>` and exit 1.
A program whose library has no sharded pub/sub at all in its mode prints `NOSHARD <why>`
first and leaves SH out of every step; the table below says which may.
"""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, mesh_yaml, wait_for

CLIENTS = ROOT / "tests" / "clients"
RELEASE = ROOT / "target" / "release"
PY = [sys.executable]


# id: (command, protocol argument, expected RECONNECT, NOSHARD expected)
VARIANTS = {
    "redis-py": (PY + [CLIENTS / "redis_py_sync.py"], None, "library", False),
    "redis-py-resp3": (PY + [CLIENTS / "redis_py_sync.py"], "resp3", "library", False),
    # redis.asyncio's PubSub has no ssubscribe() and does not resubscribe shard channels.
    "redis-py-asyncio": (PY + [CLIENTS / "redis_py_asyncio.py"], None, "library+app", False),
    "redis-py-asyncio-resp3": (PY + [CLIENTS / "redis_py_asyncio.py"], "resp3", "library+app", False),
    # redis-rs over RESP2 (its default) has a pub/sub connection without shard channels or
    # reconnection; over RESP3 its ConnectionManager resubscribes everything.
    "redis-rs": ([RELEASE / "client-redis-rs"], None, "app", True),
    "redis-rs-resp3": ([RELEASE / "client-redis-rs"], "resp3", "library", False),
    "fred": ([RELEASE / "client-fred"], None, "library", False),
    "fred-resp3": ([RELEASE / "client-fred"], "resp3", "library", False),
    # ioredis 6 and node-redis 6 default to RESP3.
    "ioredis": (["node", CLIENTS / "node" / "ioredis.js"], None, "library", False),
    "ioredis-resp2": (["node", CLIENTS / "node" / "ioredis.js"], "resp2", "library", False),
    "node-redis": (["node", CLIENTS / "node" / "node_redis.js"], None, "library", False),
    "node-redis-resp2": (["node", CLIENTS / "node" / "node_redis.js"], "resp2", "library", False),
    "ruby-redis": (["ruby", CLIENTS / "ruby_client.rb"], None, "app", False),
    "phpredis": (["php", CLIENTS / "php_client.php"], None, "app", False),
    "hiredis": ("hiredis", None, "app", False),  # compiled by the `hiredis` fixture
}


@pytest.fixture(scope="session")
def hiredis(tmp_path_factory):
    """Compiles tests/clients/hiredis_client.c once; a missing compiler or library fails."""
    out = tmp_path_factory.mktemp("hiredis") / "hiredis_client"
    build = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(CLIENTS / "hiredis_client.c"), "-lhiredis"],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"compiling hiredis_client.c:\n{build.stderr}"
    return out


class Program:
    """A client program as a subprocess, its stdout read line by line with deadlines."""

    def __init__(self, argv, log_dir: Path):
        self.stderr_path = log_dir / "stderr.log"
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines = []
        self._queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def transcript(self):
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr_path.read_text()[-4000:]

    def expect(self, pattern, timeout):
        """Returns the first line matching `pattern` (a regex) within `timeout` seconds;
        fails on FAIL, on exit, or on the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.transcript()}")
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait()}) before {pattern!r}:\n{self.transcript()}")
            self.lines.append(line)
            if line.startswith("FAIL"):
                raise AssertionError(f"{line}\n{self.transcript()}")
            if re.fullmatch(pattern, line):
                return line

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def accepts(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_client_defaults_pubsub_across_a_sidecar_restart(start_mesh, request, variant):
    command, protocol, reconnect, noshard = VARIANTS[variant]
    if command == "hiredis":
        command = [request.getfixturevalue("hiredis")]
    mesh = start_mesh(mesh_yaml(replicas=2, services=[("sub", []), ("pub", [])]), cells={"sub": 1, "pub": 1})
    sub, pub = mesh.cell("sub-0"), mesh.cell("pub-0")
    # Every message crosses from one transmitter to the other.
    assert sub["transmitter"] != pub["transmitter"], mesh.endpoints["cells"]

    tag = re.sub(r"[^a-z0-9]", "", variant)
    program = Program(command + [sub["resp"], pub["resp"], tag] + ([protocol] if protocol else []), mesh.dir)
    try:
        first = program.expect(r"NOSHARD .*|PHASE1 OK", timeout=30)
        assert first.startswith("NOSHARD") == noshard, f"{variant}: {first}"
        if noshard:
            program.expect(r"PHASE1 OK", timeout=30)
        program.expect(r"KILL", timeout=5)

        mesh.allow_restarts = True  # killed on purpose: `up` restarts it
        os.kill(sub["pid"], signal.SIGKILL)
        # `up` reports the new pid once the restarted sidecar is ready on the same port.
        port = int(sub["resp"].rsplit(":", 1)[1])
        wait_for(lambda: mesh.refresh() and mesh.cell("sub-0")["pid"] not in (None, sub["pid"]), timeout=30, what="sub-0 restarted")
        wait_for(lambda: accepts(port), timeout=30, what="sub-0 accepting again")
        program.send("go")

        assert program.expect(r"RECONNECT .*", timeout=35) == f"RECONNECT {reconnect}"
        program.expect(r"PHASE2 OK", timeout=5)
        assert program.proc.wait(timeout=10) == 0, program.transcript()
    finally:
        program.stop()
