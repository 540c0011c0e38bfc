// End-to-end tests of the browser client and the demo page, in Debian's Chromium (/usr/bin/chromium) driven by
// playwright-core, against `tabhub demo` on loopback. Run: `node e2e/demo.e2e.mjs` (from client/, after
// `cargo build -p tabhub -p tabhub-fixtures`; TABHUB_BIN and FIXTURES_BIN override target/debug/tabhub and
// target/debug/tabhub-fixtures). Writes test-output/demo.png and the servers' logs.
//
// 1. The page logs in as alice through token custody (the demo realm's login form), subscribes, events arrive,
//    and the session-status pushes too.
// 2. A second tab of the same browser joins the same session (the page shows 2 tabs; tabhub counts 1 user, 2
//    tabs), and the fixture gateway is called once per loop tick for both tabs. The fixture gateway does not
//    expose its counters over HTTP, so this reads tabhub's /metrics: over a window, the gateway calls
//    (`tabhub_backend_calls_total{backend="gateway"}`) equal the iterations of the only loop running
//    (`tabhub_loop_iterations_total{function="sessionStatusV2"}`), and there are as many iterations as one loop
//    makes at the short interval (5 s), not two loops' worth. A hidden tab sends `visibility {hidden}`.
// 3. tabhub is stopped (SIGTERM: it drains, closing the tabs with 1012) and started again on the same port: the
//    page reconnects by itself, resubscribes every topic with its last seen event id, and the event ids it shows
//    are exactly 1..n per project: no gap, no repeat.
//
//    Two things would make that check meaningless or impossible, hence this setup:
//    - The demo's fixture GitLab lives in the demo process, so its event log (and ids) would restart with it. Here
//      it runs in a process of its own (`tabhub-fixtures`, `tabhub demo --gitlab-url`) that outlives the restart.
//    - The login (token custody) lives in tabhub's memory; a restart forgets it (a shared store is future work):
//      a cookie page then gets 4000, re-checks /auth/me, and stops with "needLogin" (checked below too). So the
//      restart scenario runs the page in token mode (`/?mode=token&user=alice`): it fetches a demo token from the
//      realm's public client with the password grant (development only) through the client's token getter, which
//      is called again for the reconnection. The demo issuer's signing keys are fixtures, so the issuer of the
//      new process accepts them. The page subscribes with `lastEventId: "0"` ("replay history") so that its ids
//      start at 1 and "exactly 1..n" is a complete check; the ids are per project, shared by the event types, so
//      the page subscribes to every type of every project.
// 4. A screenshot of the page: test-output/demo.png (and demo-token-mode.png after the restart).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { mkdirSync, openSync, existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import { chromium } from "playwright-core";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const BIN = process.env.TABHUB_BIN || join(ROOT, "target", "debug", "tabhub");
// The fixture GitLab's own process: a binary of the fixtures crate, not of the product.
const FIXTURES_BIN = process.env.FIXTURES_BIN || join(ROOT, "target", "debug", "tabhub-fixtures");
const OUT = join(ROOT, "test-output");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PROJECTS = ["1", "2", "3"];

mkdirSync(OUT, { recursive: true });

// ---- child processes: every one is killed on exit, failure included ----

const children = new Set();
function killAll(signal = "SIGKILL") {
  for (const c of children) {
    try {
      c.kill(signal);
    } catch {
      /* gone */
    }
  }
}
process.on("exit", () => killAll());
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    killAll();
    process.exit(1);
  });
}

let logCount = 0;
function start(name, args, bin = BIN) {
  const log = join(OUT, `${name}-${++logCount}.log`);
  const fd = openSync(log, "w");
  const child = spawn(bin, args, { stdio: ["ignore", fd, fd], env: { ...process.env, RUST_LOG: "info" } });
  child.log = log;
  children.add(child);
  child.exited = new Promise((resolve) =>
    child.on("exit", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    }),
  );
  return child;
}

async function stop(child, timeoutMs = 30000) {
  child.kill("SIGTERM");
  const r = await Promise.race([child.exited, sleep(timeoutMs).then(() => null)]);
  if (!r) {
    child.kill("SIGKILL");
    await child.exited;
    throw new Error(`${child.log}: did not stop within ${timeoutMs} ms of SIGTERM`);
  }
  return r;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `check` (async, truthy when done) every 200 ms until `timeoutMs`. */
async function until(what, check, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(200);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
}

async function httpStatus(url) {
  try {
    return (await fetch(url)).status;
  } catch {
    return 0;
  }
}

async function metrics() {
  const text = await (await fetch(`${base}/metrics`)).text();
  const sum = (name, filter = "") =>
    text
      .split("\n")
      .filter((l) => l.startsWith(name) && l.includes(filter) && (l[name.length] === "{" || l[name.length] === " "))
      .reduce((acc, l) => acc + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
  return {
    gatewayCalls: sum("tabhub_backend_calls_total", 'backend="gateway"'),
    iterations: sum("tabhub_loop_iterations_total", 'function="sessionStatusV2"'),
    allIterations: sum("tabhub_loop_iterations_total"),
    users: sum("tabhub_users"),
    tabs: sum("tabhub_tabs"),
  };
}

// ---- the setup ----

let port;
let base;
let gitlab;
let tabhub;
let browser;
let cookieContext;
let page1;
let page2;

function startTabhub() {
  return start("tabhub", ["demo", "--listen", `127.0.0.1:${port}`, "--gitlab-url", `http://127.0.0.1:${gitlabPort}`]);
}
let gitlabPort;

async function waitReady(child) {
  await until(`${base}/readyz`, async () => {
    const exited = await Promise.race([child.exited, sleep(0).then(() => null)]);
    if (exited) throw new Error(`tabhub exited: ${JSON.stringify(exited)}; see ${child.log}`);
    return (await httpStatus(`${base}/readyz`)) === 200;
  });
}

before(async () => {
  assert.ok(existsSync(BIN), `${BIN} is missing: run cargo build first`);
  assert.ok(existsSync(FIXTURES_BIN), `${FIXTURES_BIN} is missing: run cargo build -p tabhub-fixtures first`);
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  gitlabPort = await freePort();
  port = await freePort();
  base = `http://127.0.0.1:${port}`;
  gitlab = start("fixtures", ["--listen", `127.0.0.1:${gitlabPort}`], FIXTURES_BIN);
  await until("the fixture GitLab", async () => (await httpStatus(`http://127.0.0.1:${gitlabPort}/api/v4/projects/1/events/stream`)) === 401);
  tabhub = startTabhub();
  await waitReady(tabhub);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    // Without the background-networking flags Chromium's own connections are refused by the closed network.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  for (const c of [...children]) await stop(c, 20000).catch(() => {});
  killAll();
});

/** Records what a page sends and receives on its websockets. */
function watchFrames(page) {
  const frames = [];
  page.on("websocket", (ws) => {
    const at = () => Date.now();
    frames.push({ dir: "open", url: ws.url(), at: at() });
    ws.on("framesent", (f) => frames.push({ dir: "sent", msg: safeJson(f.payload), at: at() }));
    ws.on("framereceived", (f) => frames.push({ dir: "received", msg: safeJson(f.payload), at: at() }));
    ws.on("close", () => frames.push({ dir: "close", at: at() }));
  });
  page.on("pageerror", (e) => console.error("page error:", e.message));
  return frames;
}

function safeJson(s) {
  try {
    return JSON.parse(String(s));
  } catch {
    return null;
  }
}

const demoState = (page) =>
  page.evaluate(() => {
    const d = window.tabhubDemo;
    return {
      state: d.client ? d.client.state : document.getElementById("state").dataset.state,
      stopReason: (d.states.filter((s) => s.state === "stopped").pop() || {}).reason,
      events: d.events,
      statuses: d.statuses.length,
      tabs: document.getElementById("tabs").dataset.tabs,
      stats: d.client ? d.client.stats : null,
      lastEventIds: d.client ? Object.fromEntries(d.client.topics.map((t) => [t, d.client.lastEventId(t)])) : {},
    };
  });

// ---- the scenarios (in order: each builds on the previous one) ----

test("1. log in as alice through token custody, subscribe, receive events and session-status pushes", async () => {
  cookieContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page1 = await cookieContext.newPage();
  watchFrames(page1);
  await page1.goto(`${base}/`);
  await page1.locator("#login").waitFor({ state: "visible" });
  await page1.click("#login-link");
  // The demo realm's login form (as Keycloak's): one-click development users.
  await page1.waitForURL(/\/realms\/demo\/protocol\/openid-connect\/auth/);
  await page1.click("button:has-text('Sign in as alice')");
  await page1.waitForURL(`${base}/`);
  await until("the page to connect", async () => (await demoState(page1)).state === "open");
  assert.equal(await page1.textContent("#user"), "alice");
  assert.match(await page1.textContent("#mode"), /cookie/);
  // Project 1, every type (events on projects 1-3 every 1-2 s).
  for (const type of ["push", "pipeline", "merge_request", "issue"]) {
    await page1.check(`input[data-topic="/project/1/${type}"]`);
  }
  const s = await until("3 events on project 1", async () => {
    const st = await demoState(page1);
    return st.events.length >= 3 && st;
  }, 45000);
  for (const e of s.events) assert.match(e.topic, /^\/project\/1\//);
  assert.ok(s.events.every((e) => /^\d+$/.test(e.id)), "events carry their ids");
  assert.ok((await page1.locator("#events tbody tr").count()) >= 3, "shown in the log");
  await until("a sessionStatusV2 push", async () => (await demoState(page1)).statuses >= 1);
});

test("2. a second tab joins the same session; the gateway is called once per tick for both", async () => {
  page2 = await cookieContext.newPage();
  const frames2 = watchFrames(page2);
  await page2.goto(`${base}/`);
  await until("the second tab to connect", async () => (await demoState(page2)).state === "open");
  // Both pages show the session's two tabs (/auth/me `tabs`, refreshed every 3 s).
  await until("both pages to show 2 tabs", async () =>
    (await demoState(page1)).tabs === "2" && (await demoState(page2)).tabs === "2",
  );
  const m = await metrics();
  assert.equal(m.users, 1, "one user session");
  assert.equal(m.tabs, 2, "two tabs");
  await until("a sessionStatusV2 in the second tab (the session's snapshot)", async () => (await demoState(page2)).statuses >= 1, 10000);

  // One loop per user, whatever the number of tabs: over 16 s, the gateway calls equal the loop iterations, and
  // there are as many as one loop makes at 5 s (3 or 4; two loops would make 6 or more).
  const m0 = await metrics();
  await sleep(16000);
  const m1 = await metrics();
  const calls = m1.gatewayCalls - m0.gatewayCalls;
  const iterations = m1.iterations - m0.iterations;
  console.log(`# window of 16 s with 2 tabs: ${iterations} sessionStatusV2 iterations, ${calls} gateway calls`);
  assert.equal(m1.allIterations - m0.allIterations, iterations, "no other loop runs");
  assert.equal(calls, iterations, "one gateway call per tick");
  assert.ok(iterations >= 2 && iterations <= 4, `one loop's worth of ticks (${iterations})`);

  // A hidden tab says so (the short loop slows down only while all the user's tabs are hidden).
  const setHidden = (hidden) =>
    page2.evaluate((h) => {
      Object.defineProperty(document, "hidden", { configurable: true, get: () => h });
      document.dispatchEvent(new Event("visibilitychange"));
    }, hidden);
  await setHidden(true);
  await until("visibility {hidden: true}", async () =>
    frames2.some((f) => f.dir === "sent" && f.msg?.type === "visibility" && f.msg.data.hidden === true && f.msg.id != null),
  );
  await setHidden(false);
  await until("visibility {hidden: false}", async () =>
    frames2.some((f) => f.dir === "sent" && f.msg?.type === "visibility" && f.msg.data.hidden === false),
  );

  await page1.screenshot({ path: join(OUT, "demo.png"), fullPage: true });
});

/** Per project: the ids received, checked to be exactly 1..n with no repeat. */
function checkContiguous(events) {
  const byProject = {};
  for (const e of events) (byProject[e.topic.split("/")[2]] ||= []).push(Number(e.id));
  for (const [project, ids] of Object.entries(byProject)) {
    const sorted = [...ids].sort((a, b) => a - b);
    assert.equal(new Set(sorted).size, sorted.length, `project ${project}: no repeat (${sorted})`);
    assert.deepEqual(sorted, sorted.map((_, i) => i + 1), `project ${project}: ids 1..${sorted.length}, no gap (${sorted})`);
  }
  return Object.fromEntries(Object.entries(byProject).map(([p, ids]) => [p, Math.max(...ids)]));
}

test("3. tabhub restarts: the page reconnects by itself and misses no event", async () => {
  const tokenContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page3 = await tokenContext.newPage();
  const frames = watchFrames(page3);
  await page3.goto(`${base}/?mode=token&user=alice`);
  await until("the token-mode page to connect", async () => (await demoState(page3)).state === "open");
  await page3.check("#replay");
  await page3.click("#all");
  const before = await until("events on every project", async () => {
    const st = await demoState(page3);
    const projects = new Set(st.events.map((e) => e.topic.split("/")[2]));
    return projects.size === 3 && st.events.length >= 10 && st;
  }, 60000);
  const maxBefore = checkContiguous(before.events);
  assert.equal(before.stats.tokenRequests, 1);

  // SIGTERM: tabhub drains (tabs closed with 1012 over its window) and exits; events go on meanwhile.
  const stoppedAt = Date.now();
  const exit = await stop(tabhub, 40000);
  assert.equal(exit.code, 0, `tabhub exited cleanly (${JSON.stringify(exit)})`);
  const atStop = await demoState(page3);
  assert.notEqual(atStop.state, "open", "the page saw the connection go");
  const lastIdsAtStop = atStop.lastEventIds;
  await sleep(3000); // down for a while: events happen that only a resume can bring
  tabhub = startTabhub();
  await waitReady(tabhub);
  console.log(`# tabhub down for ${Date.now() - stoppedAt} ms (drain included)`);

  const afterRestart = await until("the page to reconnect and receive newer events on every project", async () => {
    const st = await demoState(page3);
    if (st.state !== "open") return false;
    const max = {};
    for (const e of st.events) max[e.topic.split("/")[2]] = Math.max(max[e.topic.split("/")[2]] || 0, Number(e.id));
    return PROJECTS.every((p) => max[p] > (maxBefore[p] || 0)) && st;
  }, 90000);

  // The page's own decisions: a 1012 close, then reconnecting with a fresh token from the getter.
  const states = await page3.evaluate(() => window.tabhubDemo.states);
  assert.ok(states.some((s) => s.state === "waiting" && s.code === 1012 && s.decision === "quick"), "1012: quick reconnect");
  assert.ok(afterRestart.stats.reconnects >= 1);
  assert.ok(afterRestart.stats.tokenRequests >= 2, "the token getter was called for the reconnection");

  // It resubscribed every topic with its last seen event id.
  const opens = frames.filter((f) => f.dir === "open");
  assert.ok(opens.length >= 2, "a second websocket");
  const lastOpen = opens[opens.length - 1].at;
  const resubs = frames.filter((f) => f.dir === "sent" && f.at >= lastOpen && f.msg?.type === "subscribe").map((f) => f.msg.data);
  assert.equal(resubs.length, 12, "every topic");
  for (const r of resubs) {
    assert.equal(r.lastEventId, lastIdsAtStop[r.topic], `${r.topic} resumes from its last seen event id`);
  }

  // Nothing lost, nothing repeated: exactly 1..n per project.
  const maxAfter = checkContiguous(afterRestart.events);
  console.log(`# ids per project before the restart ${JSON.stringify(maxBefore)}, after ${JSON.stringify(maxAfter)}; repeats dropped by the client: ${afterRestart.stats.duplicates}`);
  await page3.screenshot({ path: join(OUT, "demo-token-mode.png"), fullPage: true });

  // The cookie pages: the new instance does not know their login (in-memory store), so they stop and ask for it.
  for (const page of [page1, page2]) {
    await until("a cookie page to stop with needLogin", async () => {
      const st = await demoState(page);
      return st.state === "stopped" && st.stopReason === "needLogin";
    }, 60000);
  }
  assert.ok(await page1.locator("#login").isVisible(), "the login offer is shown again");
});

test("4. the screenshot was written", () => {
  const png = readFileSync(join(OUT, "demo.png"));
  assert.ok(png.length > 10000);
  assert.equal(png.subarray(1, 4).toString(), "PNG");
});
