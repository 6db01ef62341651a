// ioredis through the client-matrix scenario of tests/test_clients.py.
"use strict";
const Redis = require("ioredis");
const { Scenario, say, fail } = require("./scenario");

async function main() {
  const s = new Scenario();
  const opts = s.protocol ? { protocol: s.protocol } : {};
  const sub = new Redis(s.sub.port, s.sub.host, opts);
  const pub = new Redis(s.pub.port, s.pub.host, opts);
  if ((await sub.ping()) !== "PONG" || (await pub.ping()) !== "PONG") fail("PING");

  sub.on("message", (ch, msg) => s.received("message", ch, null, msg));
  sub.on("pmessage", (pat, ch, msg) => s.received("pmessage", ch, pat, msg));
  sub.on("smessage", (ch, msg) => s.received("smessage", ch, null, msg));
  // Each promise resolves on the server's confirmation.
  await sub.subscribe(s.ch);
  await sub.psubscribe(s.pat);
  await sub.ssubscribe(s.sh);

  const publish = (command, channel, payload) =>
    command === "PUBLISH" ? pub.publish(channel, payload) : pub.spublish(channel, payload);
  await s.phase1(publish);
  await s.phase2(publish); // autoResubscribe restores all three subscriptions
  say("RECONNECT library");
  say("PHASE2 OK");
  sub.disconnect();
  pub.disconnect();
}

main().catch((e) => fail(e.stack.replace(/\n/g, " | ")));
