// node-redis (`redis` on npm) through the client-matrix scenario of tests/test_clients.py.
"use strict";
const { createClient } = require("redis");
const { Scenario, say, fail } = require("./scenario");

async function main() {
  const s = new Scenario();
  const connect = async ({ host, port }) => {
    const client = createClient({ socket: { host, port }, ...(s.protocol ? { RESP: s.protocol } : {}) });
    // node-redis requires an error listener; it reconnects by itself after an error.
    client.on("error", (e) => console.error(`node-redis: ${e.message}`));
    await client.connect();
    return client;
  };
  const sub = await connect(s.sub);
  const pub = await connect(s.pub);
  if ((await sub.ping()) !== "PONG" || (await pub.ping()) !== "PONG") fail("PING");

  // Each promise resolves on the server's confirmation.
  await sub.subscribe(s.ch, (msg, ch) => s.received("message", ch, null, msg));
  await sub.pSubscribe(s.pat, (msg, ch) => s.received("pmessage", ch, s.pat, msg));
  await sub.sSubscribe(s.sh, (msg, ch) => s.received("smessage", ch, null, msg));

  const publish = (command, channel, payload) =>
    command === "PUBLISH" ? pub.publish(channel, payload) : pub.sPublish(channel, payload);
  await s.phase1(publish);
  await s.phase2(publish); // node-redis resubscribes everything on reconnect
  say("RECONNECT library");
  say("PHASE2 OK");
  sub.destroy();
  pub.destroy();
}

main().catch((e) => fail(e.stack.replace(/\n/g, " | ")));
