// The client-matrix scenario (spec at the top of tests/test_clients.py) for the Node.js
// programs: argv, channel names, the output lines and the check of what the subscriber gets.
"use strict";
const readline = require("node:readline");

const N = 20;

function say(line) {
  console.log(line); // synchronous on a pipe, so nothing is lost at exit
}

function fail(why) {
  say(`FAIL ${why}`);
  process.exit(1);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Polls `done` every 10 ms until it holds; fails after `ms`.
async function until(done, ms, what) {
  const deadline = Date.now() + ms;
  while (!done()) {
    if (Date.now() > deadline) fail(`${what} timed out`);
    await sleep(10);
  }
}

class Scenario {
  constructor(argv = process.argv.slice(2)) {
    if (argv.length < 3 || argv.length > 4 || (argv[3] && !["resp2", "resp3"].includes(argv[3]))) {
      fail("usage: <sub host:port> <pub host:port> <tag> [resp2|resp3]");
    }
    const addr = (a) => ({ host: a.slice(0, a.lastIndexOf(":")), port: Number(a.slice(a.lastIndexOf(":") + 1)) });
    [this.sub, this.pub] = [addr(argv[0]), addr(argv[1])];
    const tag = argv[2];
    // undefined keeps the library's default protocol.
    this.protocol = argv[3] && Number(argv[3].slice(4));
    [this.ch, this.pat, this.px, this.sh] = [`t.${tag}.ch`, `t.${tag}.p*`, `t.${tag}.px`, `{t${tag}}sh`];
    // kind -> [channel, pattern, payload prefix of phase 1]
    this.want = { message: [this.ch, null, "c"], pmessage: [this.px, this.pat, "p"], smessage: [this.sh, null, "s"] };
    this.phase = 1;
    this.reset();
  }

  reset() {
    this.got = { message: [], pmessage: [], smessage: [] };
  }

  // Checks one message as it arrives: right kind and names, in order, never twice.
  received(kind, channel, pattern, data) {
    const want = this.want[kind];
    if (!want) fail(`unexpected ${kind} ${channel} ${data}`);
    const [ch, pat, prefix] = want;
    if (channel !== ch || pattern !== pat) fail(`${kind} on ${channel} pattern ${pattern}, expected ${ch} ${pat}`);
    const got = this.got[kind];
    const expected = this.phase === 1 ? `${prefix}${got.length + 1}` : null;
    if (expected ? data !== expected : !data.startsWith("after")) {
      fail(`${kind} ${data} after ${got.slice(-3)}, expected ${expected ?? "after<k>"}`);
    }
    got.push(data);
  }

  phase1Done() {
    return Object.values(this.got).every((g) => g.length === N);
  }

  phase2Done() {
    return Object.values(this.got).every((g) => g.length > 0);
  }

  counts() {
    return JSON.stringify(Object.fromEntries(Object.entries(this.got).map(([k, g]) => [k, g.length])));
  }

  // [command, channel, payload] of round i: c<i>/p<i>/s<i> in phase 1, after<i> in phase 2.
  publishes(i) {
    const p = (prefix) => (this.phase === 1 ? `${prefix}${i}` : `after${i}`);
    return [
      ["PUBLISH", this.ch, p("c")],
      ["PUBLISH", this.px, p("p")],
      ["SPUBLISH", this.sh, p("s")],
    ];
  }

  // Phase 1's publishes, each answered >= 1, then all 60 messages within 10 s.
  async phase1(publish) {
    for (let i = 1; i <= N; i++) {
      for (const [command, channel, payload] of this.publishes(i)) {
        const n = await publish(command, channel, payload);
        if (!(n >= 1)) fail(`${command} ${channel} ${payload} answered ${n}`);
      }
    }
    await until(() => this.phase1Done(), 10000, `phase 1 (got ${this.counts()})`);
  }

  // PHASE1 OK, KILL, the test's `go`, then a round of publishes every 100 ms (errors
  // retried by the next round) until each subscription got an after<k>, within 30 s.
  async phase2(publish) {
    say("PHASE1 OK");
    say("KILL");
    const rl = readline.createInterface({ input: process.stdin });
    const line = await new Promise((resolve) => {
      rl.once("line", resolve);
      rl.once("close", () => resolve(""));
    });
    rl.close();
    if (line.trim() !== "go") fail("expected `go` on stdin");
    this.phase = 2;
    this.reset();
    let k = 0;
    const round = async () => {
      k += 1;
      try {
        for (const [command, channel, payload] of this.publishes(k)) await publish(command, channel, payload);
      } catch {
        // the next round retries
      }
    };
    const timer = setInterval(round, 100);
    await until(() => this.phase2Done(), 30000, `phase 2 (got ${this.counts()})`);
    clearInterval(timer);
  }
}

module.exports = { Scenario, say, fail, until };
