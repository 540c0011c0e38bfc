// The client against a scripted fake WebSocket (Node 20 has no global one, and none is needed): request ids and
// replies, timeouts, resubscription with the last event ids after a reconnect, dedupe, the close-code decisions
// end to end, the token getter and the cookie session check, visibility.
import { test } from "node:test";
import assert from "node:assert/strict";

import { TabHubClient, TabHubError } from "../tabhub.js";

/** A fake WebSocket: records what the client sends; the test plays the server. */
class FakeSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen && this.onopen({});
    });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }
  // ---- the server side ----
  reply(type, data = {}, id) {
    const msg = { timestamp: new Date().toISOString(), scope: "user", type, data };
    if (id !== undefined) msg.id = id;
    this.onmessage({ data: JSON.stringify(msg) });
  }
  init(user = "alice") {
    this.reply("init", { message: "Connection established.", user, instance: "test" });
  }
  event(topic, id) {
    const [, , , eventType] = topic.split("/");
    this.onmessage({
      data: JSON.stringify({ scope: "topic", type: "event", data: { topic, eventType, id, payload: {} } }),
    });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason });
  }
  last(type) {
    return [...this.sent].reverse().find((m) => m.type === type);
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

function client(options = {}) {
  FakeSocket.all = [];
  const states = [];
  const c = new TabHubClient({
    url: "ws://tabhub.test/ws",
    WebSocket: FakeSocket,
    document: null,
    random: () => 0, // every reconnect delay is 0
    fetch: async () => ({ status: 200, ok: true }),
    ...options,
  });
  c.onState((s) => states.push(s));
  return { c, states, sock: () => FakeSocket.all[FakeSocket.all.length - 1] };
}

/** Lets the server answer every subscribe the client sent with `subscribed`. */
function confirmSubscribes(sock) {
  for (const m of sock.sent.filter((m) => m.type === "subscribe" && !m.answered)) {
    m.answered = true;
    sock.reply("subscribed", { topic: m.data.topic, added: true }, m.id);
  }
}

test("send: sets an id; the reply carrying it settles the promise; error replies reject", async () => {
  const { c, sock } = client();
  c.start();
  await tick();
  sock().init();
  const p = c.send("ping");
  const sent = sock().last("ping");
  assert.ok(sent.id !== undefined && sent.timestamp);
  assert.deepEqual(sent.data, {});
  sock().reply("ack", { message: "other" }, 999); // not ours
  sock().reply("ack", { message: "ping" }, sent.id);
  const reply = await p;
  assert.equal(reply.type, "ack");
  assert.equal(reply.data.message, "ping");

  const bad = c.send("bogus", { x: 1 });
  const id = sock().last("bogus").id;
  assert.notEqual(id, sent.id);
  sock().reply("error", { message: "Instruction of type 'bogus' is not supported." }, id);
  await assert.rejects(bad, (e) => e instanceof TabHubError && e.kind === "server" && /bogus/.test(e.message));
  c.close();
});

test("send: times out without a reply; queued before the connection opens", async () => {
  const { c, sock } = client({ requestTimeoutMs: 30 });
  const early = c.send("ping", {}, { timeoutMs: 1000 });
  c.start();
  await tick();
  assert.equal(sock().sent.length, 0, "nothing is sent before init");
  sock().init();
  const queued = sock().last("ping");
  assert.ok(queued, "sent once open");
  sock().reply("ack", {}, queued.id);
  await early;
  await assert.rejects(c.send("ping"), (e) => e.kind === "timeout");
  c.close();
});

test("a close rejects the requests in flight; those not sent yet wait for the next connection", async () => {
  const { c, sock } = client();
  c.start();
  await tick();
  sock().init();
  const inFlight = c.send("ping");
  sock().serverClose(1006);
  const later = c.send("ping");
  await assert.rejects(inFlight, (e) => e.kind === "closed");
  await tick();
  sock().init();
  const resent = sock().last("ping");
  sock().reply("ack", {}, resent.id);
  await later;
  c.close();
});

test("reconnect: resubscribes every topic with its last seen event id; repeats are dropped", async () => {
  const { c, sock, states } = client();
  const seen = [];
  c.onTopic("/project/1/push", (e) => seen.push(e.id));
  c.onTopic("/project/1/issue", (e) => seen.push(e.id));
  c.start();
  await tick();
  sock().init();
  const sub = c.subscribe("/project/1/push");
  const sub2 = c.subscribe("/project/1/issue", { lastEventId: "0" });
  assert.deepEqual(sock().last("subscribe").data, { topic: "/project/1/issue", lastEventId: "0" });
  confirmSubscribes(sock());
  assert.deepEqual(await sub, { topic: "/project/1/push", added: true });
  await sub2;
  sock().event("/project/1/issue", "1");
  sock().event("/project/1/push", "2");
  sock().event("/project/1/push", "3");
  sock().event("/project/1/push", "3"); // a repeat
  assert.deepEqual(seen, ["1", "2", "3"]);
  assert.equal(c.stats.duplicates, 1);

  const first = sock();
  first.serverClose(1012, "server restarting");
  assert.equal(states.at(-1).state, "waiting");
  assert.equal(states.at(-1).decision, "quick");
  await tick(5);
  assert.notEqual(sock(), first, "a new socket");
  sock().init();
  const subs = sock().sent.filter((m) => m.type === "subscribe").map((m) => m.data);
  assert.deepEqual(subs, [
    { topic: "/project/1/issue", lastEventId: "1" },
    { topic: "/project/1/push", lastEventId: "3" },
  ]);
  confirmSubscribes(sock());
  // The new instance replays from there; what the page already had is dropped.
  sock().event("/project/1/push", "3");
  sock().event("/project/1/issue", "4");
  assert.deepEqual(seen, ["1", "2", "3", "4"]);
  assert.equal(c.stats.reconnects, 1);
  c.close();
});

test("subscribe while disconnected: settled by the resubscription of the next connection", async () => {
  const { c, sock } = client();
  c.start();
  const p = c.subscribe("/project/2/pipeline");
  await tick();
  sock().init();
  assert.deepEqual(sock().last("subscribe").data, { topic: "/project/2/pipeline" });
  confirmSubscribes(sock());
  assert.deepEqual(await p, { topic: "/project/2/pipeline", added: true });
  c.close();
});

test("unsubscribe and setSubscriptions change what is resubscribed", async () => {
  const { c, sock } = client();
  c.start();
  await tick();
  sock().init();
  c.subscribe("/project/1/push");
  c.subscribe("/project/2/push");
  confirmSubscribes(sock());
  const u = c.unsubscribe("/project/1/push");
  sock().reply("unsubscribed", { topic: "/project/1/push", removed: true }, sock().last("unsubscribe").id);
  assert.deepEqual(await u, { topic: "/project/1/push", removed: true });
  const s = c.setSubscriptions(["/project/2/push", "/project/3/issue", "/project/3/nope"]);
  const req = sock().last("setSubscriptions");
  assert.deepEqual(req.data.topics, ["/project/2/push", "/project/3/issue", "/project/3/nope"]);
  sock().reply(
    "subscriptions",
    {
      added: ["/project/3/issue"],
      removed: [],
      topics: ["/project/2/push", "/project/3/issue"],
      failed: [{ topic: "/project/3/nope", message: "limit" }],
    },
    req.id,
  );
  await s;
  assert.deepEqual(c.topics.sort(), ["/project/2/push", "/project/3/issue"]);
  // A 403 from GitLab drops the project's subscriptions server-side: the client forgets them too.
  sock().reply("subscriptionError", { topic: "/project/3/issue", status: 403, message: "no" });
  assert.deepEqual(c.topics, ["/project/2/push"]);
  sock().serverClose(1006);
  await tick(5);
  sock().init();
  assert.deepEqual(
    sock()
      .sent.filter((m) => m.type === "subscribe")
      .map((m) => m.data.topic),
    ["/project/2/push"],
  );
  c.close();
});

test("stops on 4001 (invalid token) and 4003 (logged out)", async () => {
  for (const [code, reason] of [
    [4001, "invalidToken"],
    [4003, "loggedOut"],
  ]) {
    const { c, sock, states } = client({ token: "t" });
    c.start();
    await tick();
    sock().serverClose(code);
    assert.deepEqual([states.at(-1).state, states.at(-1).reason], ["stopped", reason]);
    const sockets = FakeSocket.all.length;
    await tick(10);
    assert.equal(FakeSocket.all.length, sockets, "no reconnection");
  }
});

test("token mode: the getter is called before each connection, with the reason; subprotocol form", async () => {
  const reasons = [];
  let n = 0;
  const { c, sock, states } = client({
    token: async ({ reason }) => {
      reasons.push(reason);
      return `tok${++n}`;
    },
  });
  c.start();
  await tick();
  assert.deepEqual(sock().protocols, ["tabhub", "tabhub.bearer.tok1"]);
  sock().init();
  sock().serverClose(4002, "token expired");
  await tick(5);
  assert.deepEqual(sock().protocols, ["tabhub", "tabhub.bearer.tok2"]);
  sock().serverClose(1006);
  await tick(5);
  assert.deepEqual(reasons, ["connect", "expired", "reconnect"]);
  // authExpiring: a fresh token is sent with authenticate, on the open connection.
  sock().init();
  sock().reply("authExpiring", { expiresIn: 30 });
  await tick();
  assert.deepEqual(sock().last("authenticate").data, { token: "tok4" });
  assert.equal(reasons.at(-1), "expiring");
  // A getter that fails is a failed attempt (backoff), not a stop.
  c.options.token = async () => {
    throw new Error("identity provider down");
  };
  sock().serverClose(1006);
  await tick(5);
  assert.ok(states.some((s) => s.state === "waiting" && /identity provider down/.test(s.closeReason)));
  assert.notEqual(c.state, "stopped");
  // A getter with nothing to give: the user must log in.
  c.options.token = async () => null;
  await tick(20);
  assert.deepEqual([c.state, states.at(-1).reason], ["stopped", "needLogin"]);
});

test("token mode: the same refused credential gives up after maxAuthRetries", async () => {
  const { c, sock, states } = client({ token: () => "stale", maxAuthRetries: 2 });
  c.start();
  for (let i = 0; i < 3; i++) {
    await tick(5);
    sock().serverClose(4002);
  }
  assert.deepEqual([states.at(-1).state, states.at(-1).reason], ["stopped", "needLogin"]);
  assert.equal(FakeSocket.all.length, 3);
  c.close();
});

test("cookie mode: no subprotocol; after 4000 the session is re-checked at /auth/me", async () => {
  let loggedIn = true;
  const asked = [];
  const { c, sock, states } = client({
    url: "ws://tabhub.test/ws",
    fetch: async (url, init) => {
      asked.push([url, init.credentials]);
      return loggedIn ? { status: 200, ok: true } : { status: 401, ok: false };
    },
  });
  c.start();
  await tick();
  // Cookie mode offers the tabhub subprotocol alone: the whole protocol, no token in the URL or protocols.
  assert.deepEqual(sock().protocols, ["tabhub"]);
  assert.equal(asked.length, 0, "no check before the first connection");
  sock().serverClose(4000);
  await tick(5);
  assert.deepEqual(asked, [["http://tabhub.test/auth/me", "same-origin"]]);
  assert.equal(FakeSocket.all.length, 2, "logged in: reconnected");
  loggedIn = false;
  sock().serverClose(4002);
  await tick(5);
  assert.equal(FakeSocket.all.length, 2, "not logged in: no reconnection");
  assert.deepEqual([states.at(-1).state, states.at(-1).reason], ["stopped", "needLogin"]);
  // After logging in again the application starts the client again.
  loggedIn = true;
  c.start();
  await tick();
  assert.equal(FakeSocket.all.length, 3);
  c.close();
});

test("visibility: sent on visibilitychange, and at connect when hidden", async () => {
  const listeners = {};
  const doc = {
    hidden: true,
    addEventListener: (t, f) => (listeners[t] = f),
    removeEventListener: (t) => delete listeners[t],
  };
  const { c, sock } = client({ document: doc });
  c.start();
  await tick();
  sock().init();
  assert.deepEqual(sock().last("visibility").data, { hidden: true });
  doc.hidden = false;
  listeners.visibilitychange();
  assert.deepEqual(sock().last("visibility").data, { hidden: false });
  assert.ok(sock().last("visibility").id !== undefined);
  c.close();
  assert.equal(listeners.visibilitychange, undefined, "listener removed on close");
});

test("a stable connection resets the backoff", async () => {
  const { c, sock, states } = client({ random: () => 0.999, stableMs: 20, baseMs: 10 });
  c.start();
  await tick();
  sock().serverClose(1006);
  assert.equal(states.at(-1).delay, 9);
  await tick(15);
  sock().serverClose(1006);
  assert.equal(states.at(-1).delay, 19, "second failure in a row: a wider window");
  await tick(30);
  sock().init();
  await tick(40);
  sock().serverClose(1006);
  assert.equal(states.at(-1).delay, 9, "after a stable connection: back to the first window");
  c.close();
});

test("handlers: by type, '*' and state; a throwing handler does not break the client", async () => {
  const { c, sock } = client();
  const got = [];
  const off = c.on("sessionStatusV2", (d) => got.push(d.message));
  c.on("*", (d, m) => got.push(m.type));
  c.on("sessionStatusV2", () => {
    throw new Error("a bug in the application");
  });
  const reported = [];
  const original = console.error;
  console.error = (e) => reported.push(e.message);
  c.start();
  await tick();
  sock().init();
  sock().reply("sessionStatusV2", { message: "true" });
  off();
  sock().reply("sessionStatusV2", { message: "again" });
  console.error = original;
  assert.deepEqual(got, ["init", "true", "sessionStatusV2", "sessionStatusV2"]);
  assert.deepEqual(reported, ["a bug in the application", "a bug in the application"]);
  const ready = await c.ready();
  assert.equal(ready.user, "alice");
  c.close();
  await assert.rejects(c.ready());
});
