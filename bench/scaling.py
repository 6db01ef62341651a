#!/usr/bin/env python3
"""Idle cost of a mesh against its size (issue 18): for each N, `thynapse up` with N
transmitters and 2 cells; the time until a message published by a cell on the first
transmitter reaches a cell on the last one; then, once settled, the CPU all transmitters
(and the rendezvous point) use over a window while nothing is published, and their
resident memory. Prints a Markdown table, writes JSON and an SVG plot of idle CPU per
transmitter against N.

    cargo build --release --workspace
    python3 bench/scaling.py --sizes 5 10 20 40 80 --json bench/scaling.json --svg bench/scaling.svg

Needs what the tests need (redis-py, pyzmq, cryptography: tests/requirements.txt). The
cell on the last transmitter is a raw ZeroMQ client (tests/rawwire.py), since `up`
spreads its cells from the first transmitter on."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
import zmq  # noqa: E402

import rawwire  # noqa: E402
from conftest import drops, wait_for  # noqa: E402

BINARY = ROOT / "target" / "release" / "thynapse"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User and system CPU of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(n, window, settle, change_window, ctx):
    tmp = Path(tempfile.mkdtemp(prefix="thynapse-scaling-"))
    (tmp / "mesh.yaml").write_text(f"""apiVersion: thynapse.io/v1alpha1
kind: TransmitterMesh
metadata: {{name: scale}}
spec: {{replicas: {n}}}
---
apiVersion: thynapse.io/v1alpha1
kind: Service
metadata: {{name: s}}
spec: {{mesh: scale}}
""")
    endpoints_path = tmp / "endpoints.json"
    started = time.monotonic()
    up = subprocess.Popen([str(BINARY), "up", "-f", str(tmp), "--cells", "s=2", "--endpoints", str(endpoints_path)],
                          stdout=subprocess.DEVNULL, stderr=open(tmp / "up.log", "w"), start_new_session=True)
    try:
        endpoints = wait_for(lambda: json.loads(endpoints_path.read_text()), timeout=120 + n, what="endpoints")
        ready = time.monotonic() - started
        token = Path(endpoints["token_file"]).read_text().split()[0].encode()
        # A cell (on scale-0, unless it moved at start) and a reader as far from it as
        # the mesh goes.
        cell = min(endpoints["cells"], key=lambda c: int(c["transmitter"].rsplit("-", 1)[1]))
        far = f"scale-{n - 1}" if cell["transmitter"] != f"scale-{n - 1}" else "scale-0"
        last = next(t for t in endpoints["transmitters"] if t["name"] == far)
        rawwire.TOKENS[last["command"]] = token
        reader = rawwire.RawCell(ctx, last["command"], service="s")
        reader.hello()
        reader.subscribe(["first"], sync=1)
        host, port = cell["resp"].rsplit(":", 1)
        publisher = redis.Redis(host=host, port=int(port), socket_timeout=10)
        wait_for(lambda: publisher.publish("first", b"hello") >= 1, timeout=60, interval=0.05, what="first message routed")
        reader.read_deliveries(1)
        routed = time.monotonic() - started
        time.sleep(settle)
        pids = [t["pid"] for t in endpoints["transmitters"]]
        rendezvous = [r["pid"] for r in endpoints["rendezvous"]]
        before = {p: cpu_seconds(p) for p in pids + rendezvous}
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        used = {p: cpu_seconds(p) - before[p] for p in before}
        transmitters_cpu = sum(used[p] for p in pids) / elapsed
        row = {
            "transmitters": n,
            "up_s": round(ready, 2),
            "first_message_s": round(routed, 2),
            "idle_cpu_all_transmitters": round(transmitters_cpu, 4),
            "idle_cpu_per_transmitter": round(transmitters_cpu / n, 5),
            "idle_cpu_rendezvous": round(sum(used[p] for p in rendezvous) / elapsed, 4),
            "rss_all_transmitters_mib": round(sum(rss_bytes(p) for p in pids) / 2**20, 1),
            "rss_per_transmitter_mib": round(sum(rss_bytes(p) for p in pids) / 2**20 / n, 2),
        }
        # A membership change: one transmitter killed (`up` starts it again). What the
        # rendezvous sends the others about it, against what one whole answer weighs.
        point = endpoints["rendezvous"][0]["metrics"]

        def answers(what):
            return drops(point, f"thynapse_rendezvous_membership_answer{what}_total", label="kind")

        count0, bytes0 = answers("s"), answers("_bytes")
        victim = next(t for t in endpoints["transmitters"] if t["name"] == f"scale-{n // 2}")
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(change_window)
        count1, bytes1 = answers("s"), answers("_bytes")
        fulls = count1["full"] - count0["full"]
        changed = count1["changed"] - count0["changed"]
        row["kill_changed_answers"] = int(changed)
        row["kill_changed_answer_bytes"] = round((bytes1["changed"] - bytes0["changed"]) / changed) if changed else None
        row["whole_membership_answer_bytes"] = round((bytes1["full"] - bytes0["full"]) / fulls) if fulls else None
        reader.close()
        publisher.close()
        return row
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def svg(rows, title):
    """Idle CPU per transmitter (% of a core) against N, on a plain SVG line plot."""
    w, h, left, bottom, top, right = 640, 360, 70, 50, 40, 20
    xs = [r["transmitters"] for r in rows]
    ys = [100 * r["idle_cpu_per_transmitter"] for r in rows]
    xmax, ymax = max(xs) * 1.05, max(max(ys) * 1.15, 0.1)

    def px(x):
        return left + (w - left - right) * x / xmax

    def py(y):
        return h - bottom - (h - bottom - top) * y / ymax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{py(0)}" x2="{w - right}" y2="{py(0)}" stroke="black"/>',
           f'<line x1="{left}" y1="{py(0)}" x2="{left}" y2="{top}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">transmitters (N)</text>',
           f'<text x="16" y="{h / 2}" text-anchor="middle" transform="rotate(-90 16 {h / 2})">'
           'idle CPU per transmitter (% of a core)</text>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{left - 6}" y="{py(y) + 4}" text-anchor="end">{y:.2f}</text>')
        out.append(f'<line x1="{left}" y1="{py(y)}" x2="{w - right}" y2="{py(y)}" stroke="#ddd"/>')
    for x in xs:
        out.append(f'<text x="{px(x)}" y="{py(0) + 16}" text-anchor="middle">{x}</text>')
    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    out.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for x, y in zip(xs, ys):
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="#1f77b4"/>')
        out.append(f'<text x="{px(x):.1f}" y="{py(y) - 8:.1f}" text-anchor="middle">{y:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    parser.add_argument("--window", type=float, default=10, help="seconds of idle CPU measured")
    parser.add_argument("--settle", type=float, default=5, help="seconds waited after the first message")
    parser.add_argument("--change-window", type=float, default=5,
                        help="seconds of rendezvous answers counted after one transmitter is killed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--svg", type=Path)
    args = parser.parse_args()
    ctx = zmq.Context()
    rows = []
    print("| transmitters | up (s) | first message (s) | idle CPU, all transmitters | each | rendezvous "
          "| RSS, all | each | a kill: `changed` answers | bytes each | a whole answer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        r = measure(n, args.window, args.settle, args.change_window, ctx)
        rows.append(r)
        print(f"| {n} | {r['up_s']} | {r['first_message_s']} | {100 * r['idle_cpu_all_transmitters']:.1f}% "
              f"| {100 * r['idle_cpu_per_transmitter']:.2f}% | {100 * r['idle_cpu_rendezvous']:.2f}% "
              f"| {r['rss_all_transmitters_mib']} MiB | {r['rss_per_transmitter_mib']} MiB "
              f"| {r['kill_changed_answers']} | {r['kill_changed_answer_bytes']} B | {r['whole_membership_answer_bytes']} B |", flush=True)
    ctx.destroy(linger=0)
    machine = f"{os.cpu_count()} cores"
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    if args.svg:
        args.svg.write_text(svg(rows, f"Idle CPU per transmitter, thynapse up, 2 cells ({machine})"))


if __name__ == "__main__":
    main()
