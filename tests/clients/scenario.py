"""The client-matrix scenario (spec at the top of tests/test_clients.py) for the Python
programs: argv, channel names, the output lines and the check of what the subscriber gets."""

import sys

N = 20


def say(line):
    print(line, flush=True)


def fail(why):
    say(f"FAIL {why}")
    sys.exit(1)


def text(b):
    return b.decode() if isinstance(b, bytes) else b


class Scenario:
    def __init__(self, argv=None):
        argv = sys.argv[1:] if argv is None else argv
        if len(argv) not in (3, 4) or argv[3:] not in ([], ["resp2"], ["resp3"]):
            fail("usage: <sub host:port> <pub host:port> <tag> [resp2|resp3]")
        self.sub, self.pub = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in argv[:2])]
        tag = argv[2]
        # None keeps the library's default protocol.
        self.protocol = {"resp2": 2, "resp3": 3}.get(argv[3]) if len(argv) == 4 else None
        self.ch, self.pat, self.px, self.sh = f"t.{tag}.ch", f"t.{tag}.p*", f"t.{tag}.px", f"{{t{tag}}}sh"
        # kind -> (channel, pattern, payload prefix of phase 1)
        self.want = {"message": (self.ch, None, "c"), "pmessage": (self.px, self.pat, "p"), "smessage": (self.sh, None, "s")}
        self.got = {kind: [] for kind in self.want}
        self.phase = 1

    def received(self, kind, channel, pattern, data):
        """Checks one message as it arrives: right kind and names, in order, never twice."""
        channel, pattern, data = text(channel), text(pattern), text(data)
        if kind not in self.want:
            fail(f"unexpected {kind} {channel} {data}")
        ch, pat, prefix = self.want[kind]
        if (channel, pattern) != (ch, pat):
            fail(f"{kind} on {channel!r} pattern {pattern!r}, expected {ch!r} {pat!r}")
        got = self.got[kind]
        expected = f"{prefix}{len(got) + 1}" if self.phase == 1 else None
        if (expected and data != expected) or (not expected and not data.startswith("after")):
            fail(f"{kind} {data!r} after {got[-3:]}, expected {expected or 'after<k>'}")
        got.append(data)

    def phase1_done(self):
        return all(len(got) == N for got in self.got.values())

    def counts(self):
        return {kind: len(got) for kind, got in self.got.items()}

    def await_restart(self):
        """PHASE1 OK, KILL, then waits for the test's `go`; phase 2 counts afresh."""
        say("PHASE1 OK")
        say("KILL")
        if sys.stdin.readline().strip() != "go":
            fail("expected `go` on stdin")
        self.phase = 2
        self.got = {kind: [] for kind in self.want}

    def phase2_done(self):
        return all(self.got.values())

    def publishes(self, i):
        """(command, channel, payload) of round i: c<i>/p<i>/s<i> in phase 1, after<i> in 2."""
        c, p, s = (f"{prefix}{i}" if self.phase == 1 else f"after{i}" for prefix in "cps")
        return [("PUBLISH", self.ch, c), ("PUBLISH", self.px, p), ("SPUBLISH", self.sh, s)]
