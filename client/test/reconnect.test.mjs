// The client's pure reconnect logic: close-code decisions, backoff bounds and jitter, the quick reconnect after
// 1012, credential retries, and the per-topic bookkeeping. No browser, no WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  CLOSE_CODES,
  DEFAULTS,
  TopicTracker,
  backoffDelay,
  closeDecision,
  initialReconnectState,
  parseTopic,
  planReconnect,
  websocketUrl,
} from "../tabhub.js";

/** A deterministic generator cycling through `values`. */
function seq(...values) {
  let i = 0;
  return () => values[i++ % values.length];
}

/** A seeded PRNG (mulberry32) for statistical checks that do not flake. */
function prng(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("every code of the close-code tables (docs/) has the documented decision", () => {
  const expected = {
    1000: "backoff",
    1006: "backoff",
    1009: "backoff",
    1011: "backoff",
    1012: "quick",
    1013: "backoff",
    4000: "reauth",
    4001: "stop",
    4002: "reauth",
    4003: "stop",
    4008: "backoff",
    4009: "backoff",
    4029: "backoff",
  };
  for (const [code, decision] of Object.entries(expected)) {
    assert.equal(closeDecision(Number(code)), decision, `code ${code}`);
    assert.ok(CLOSE_CODES[code], `code ${code} is listed`);
  }
  // Unknown codes back off rather than stop or hammer.
  assert.equal(closeDecision(4999), "backoff");
  assert.equal(closeDecision(undefined), "backoff");
});

test("backoff: the window doubles from base up to the cap; the delay is random(0, window)", () => {
  const top = () => 0.999999;
  assert.equal(backoffDelay(0, {}, () => 0), 0);
  assert.equal(backoffDelay(0, {}, top), DEFAULTS.baseMs - 1);
  assert.equal(backoffDelay(1, {}, top), 2 * DEFAULTS.baseMs - 1);
  assert.equal(backoffDelay(3, {}, top), 8 * DEFAULTS.baseMs - 1);
  assert.equal(backoffDelay(0, {}, () => 0.5), DEFAULTS.baseMs / 2);
  // The cap bounds the window, however many attempts (and without overflow).
  for (const attempt of [6, 10, 50, 1000, Infinity]) {
    assert.ok(backoffDelay(attempt, {}, top) < DEFAULTS.capMs, `attempt ${attempt}`);
    assert.ok(backoffDelay(attempt, {}, top) >= DEFAULTS.capMs - 1);
  }
  // Options override.
  assert.equal(backoffDelay(2, { baseMs: 100, factor: 3, capMs: 500 }, top), 499);
  assert.equal(backoffDelay(1, { baseMs: 100, factor: 3, capMs: 5000 }, top), 299);
  // A bad generator cannot escape the window.
  assert.equal(backoffDelay(0, {}, () => -1), 0);
  assert.ok(backoffDelay(0, {}, () => 7) < DEFAULTS.baseMs);
  assert.equal(backoffDelay(0, {}, () => NaN), 0);
});

test("full jitter: capped delays still spread over the whole window (no lockstep)", () => {
  const random = prng(42);
  const delays = Array.from({ length: 2000 }, () => backoffDelay(20, {}, random));
  for (const d of delays) assert.ok(d >= 0 && d < DEFAULTS.capMs);
  // Ten buckets over [0, cap): each should hold about 10 %.
  const buckets = new Array(10).fill(0);
  for (const d of delays) buckets[Math.floor((d / DEFAULTS.capMs) * 10)]++;
  for (const b of buckets) assert.ok(b > 120 && b < 280, `buckets ${buckets}`);
  // Far from all equal to the cap: clients that failed together do not come back together.
  const distinct = new Set(delays).size;
  assert.ok(distinct > 1500, `${distinct} distinct delays`);
});

test("consecutive failures grow the window; a stable connection resets it", () => {
  const top = () => 0.999999;
  let state = initialReconnectState();
  const windows = [];
  for (let i = 0; i < 10; i++) {
    const plan = planReconnect(1006, state, {}, top);
    assert.equal(plan.decision, "backoff");
    windows.push(plan.delay + 1);
    state = plan.state;
  }
  assert.deepEqual(windows, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
  // The client resets the state once a connection stayed up `stableMs`.
  const fresh = planReconnect(1006, initialReconnectState(), {}, top);
  assert.equal(fresh.delay, 499);
});

test("1012: one quick jittered reconnect (0-1 s), then backoff if it repeats", () => {
  const first = planReconnect(1012, initialReconnectState(), {}, () => 0.25);
  assert.equal(first.decision, "quick");
  assert.equal(first.delay, 250);
  assert.ok(first.state.quickUsed);
  assert.equal(first.state.attempt, 0, "a quick reconnect does not count as a failure");
  for (const r of [0, 0.5, 0.999]) {
    const p = planReconnect(1012, initialReconnectState(), {}, () => r);
    assert.ok(p.delay >= 0 && p.delay < DEFAULTS.quickMaxMs);
  }
  // Jittered: many clients told 1012 together spread over the window.
  const random = prng(7);
  const quick = Array.from({ length: 500 }, () => planReconnect(1012, initialReconnectState(), {}, random).delay);
  assert.ok(new Set(quick).size > 300);
  // The reconnect failed (the new instance is not up yet): back off from there.
  const next = planReconnect(1006, first.state, {}, () => 0.999999);
  assert.equal(next.decision, "backoff");
  assert.equal(next.delay, 499);
  // Another 1012 before the connection was stable: backoff, not a second quick one.
  const again = planReconnect(1012, next.state, {}, () => 0.999999);
  assert.equal(again.decision, "backoff");
  assert.equal(again.delay, 999);
});

test("4001 and 4003 stop, saying why", () => {
  const invalid = planReconnect(4001, initialReconnectState());
  assert.deepEqual([invalid.decision, invalid.delay, invalid.reason], ["stop", null, "invalidToken"]);
  const out = planReconnect(4003, initialReconnectState());
  assert.deepEqual([out.decision, out.delay, out.reason], ["stop", null, "loggedOut"]);
});

test("4000 and 4002: fresh credential then reconnect, at most maxAuthRetries times in a row", () => {
  let state = initialReconnectState();
  const reasons = [];
  for (let i = 0; i < DEFAULTS.maxAuthRetries; i++) {
    const p = planReconnect(i % 2 ? 4002 : 4000, state, {}, () => 0);
    assert.equal(p.decision, "reauth");
    reasons.push(p.reason);
    state = p.state;
  }
  assert.deepEqual(reasons, ["missing", "expired", "missing"]);
  const giveUp = planReconnect(4002, state, {}, () => 0);
  assert.deepEqual([giveUp.decision, giveUp.reason], ["stop", "needLogin"]);
  // Opening a connection (init) resets the count; the client does that.
  const again = planReconnect(4002, { ...state, authRetries: 0 }, {}, () => 0);
  assert.equal(again.decision, "reauth");
  // Retries back off too (a credential flapping must not hammer the server).
  const top = () => 0.999999;
  let s = initialReconnectState();
  const delays = [];
  for (let i = 0; i < 3; i++) {
    const p = planReconnect(4000, s, {}, top);
    delays.push(p.delay);
    s = p.state;
  }
  assert.deepEqual(delays, [499, 999, 1999]);
});

test("topics: the form /project/<id>/<eventType>", () => {
  assert.deepEqual(parseTopic("/project/42/push"), { project: "42", eventType: "push" });
  assert.deepEqual(parseTopic("/project/group%2Fname/merge_request"), {
    project: "group%2Fname",
    eventType: "merge_request",
  });
  assert.equal(parseTopic("/project/42"), null);
  assert.equal(parseTopic("/other/1/push"), null);
});

test("tracker: last event id per topic, repeats dropped", () => {
  const t = new TopicTracker();
  t.add("/project/1/push");
  assert.equal(t.lastEventId("/project/1/push"), undefined);
  assert.ok(t.accept("/project/1/push", "3"));
  assert.ok(t.accept("/project/1/push", "5"));
  assert.equal(t.accept("/project/1/push", "3"), false, "a repeat");
  assert.equal(t.lastEventId("/project/1/push"), "5");
  // An older id arriving late (a catch-up) does not move the position back.
  assert.ok(t.accept("/project/1/push", "4"));
  assert.equal(t.lastEventId("/project/1/push"), "5");
  // Non-numeric ids: the latest.
  t.add("/project/x/push");
  t.accept("/project/x/push", "b");
  t.accept("/project/x/push", "a");
  assert.equal(t.lastEventId("/project/x/push"), "a");
  // An explicit starting point.
  t.add("/project/2/issue", "0");
  assert.equal(t.lastEventId("/project/2/issue"), "0");
  // Events of topics not tracked pass.
  assert.ok(t.accept("/project/9/push", "1"));
  assert.ok(t.accept("/project/9/push", "1"));
});

test("tracker: dedupe memory is bounded", () => {
  const t = new TopicTracker({ maxIds: 3 });
  t.add("/project/1/push");
  for (const id of ["1", "2", "3", "4"]) assert.ok(t.accept("/project/1/push", id));
  assert.equal(t.accept("/project/1/push", "4"), false);
  assert.ok(t.accept("/project/1/push", "1"), "forgotten");
  assert.equal(t.map.get("/project/1/push").seen.size, 3);
});

test("tracker: resubscriptions carry each topic's position, oldest first", () => {
  const t = new TopicTracker();
  t.add("/project/1/push");
  t.add("/project/1/issue");
  t.add("/project/2/push");
  t.add("/project/3/push");
  t.accept("/project/1/push", "12");
  t.accept("/project/1/issue", "9");
  t.accept("/project/2/push", "30");
  assert.deepEqual(t.resubscriptions(), [
    { topic: "/project/1/issue", lastEventId: "9" },
    { topic: "/project/1/push", lastEventId: "12" },
    { topic: "/project/2/push", lastEventId: "30" },
    { topic: "/project/3/push" },
  ]);
  t.remove("/project/2/push");
  assert.equal(t.resubscriptions().length, 3);
});

test("tracker: a quiet live topic resumes from its project's events received after it was confirmed", () => {
  const t = new TopicTracker();
  t.add("/project/1/push");
  t.add("/project/1/issue");
  t.add("/project/2/issue");
  t.sending("/project/1/push", true);
  t.sending("/project/1/issue", true);
  t.sending("/project/2/issue", true);
  // An event before issue's subscription is confirmed does not count for it.
  t.confirm("/project/1/push");
  t.accept("/project/1/push", "4");
  assert.equal(t.lastEventId("/project/1/issue"), undefined);
  t.confirm("/project/1/issue");
  t.confirm("/project/2/issue");
  t.accept("/project/1/push", "7");
  assert.equal(t.lastEventId("/project/1/issue"), "7", "project 1's ids are shared by its event types");
  assert.equal(t.lastEventId("/project/2/issue"), undefined, "another project");
  // A topic subscribed from an explicit position (catching up) is not moved by other topics' events.
  t.add("/project/1/pipeline", "2");
  t.sending("/project/1/pipeline", false);
  t.confirm("/project/1/pipeline");
  t.accept("/project/1/push", "8");
  assert.equal(t.lastEventId("/project/1/pipeline"), "2");
  assert.equal(t.lastEventId("/project/1/issue"), "8");
  // After a disconnect nothing is confirmed: no movement until the next subscribed reply.
  t.resetConnection();
  t.accept("/project/1/push", "9");
  assert.equal(t.lastEventId("/project/1/issue"), "8");
});

test("websocket URL: the page's origin by default, http(s) turned into ws(s)", () => {
  const loc = { href: "https://app.example/some/page?x=1" };
  assert.equal(websocketUrl(undefined, loc), "wss://app.example/ws");
  assert.equal(websocketUrl("/hub/ws", { href: "http://127.0.0.1:8090/" }), "ws://127.0.0.1:8090/hub/ws");
  assert.equal(websocketUrl("http://h:1/ws"), "ws://h:1/ws");
  assert.equal(websocketUrl("wss://h/ws"), "wss://h/ws");
});
