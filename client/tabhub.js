// tabhub browser client: one dependency-free ES module, served by tabhub at /client/tabhub.js (typings:
// /client/tabhub.d.ts).
//
//   import { connect } from "/client/tabhub.js";
//   const hub = connect();                                  // cookie mode (token custody): same origin, /ws
//   const hub = connect({ token: ({ reason }) => kc.updateToken(30).then(() => kc.token) });   // token mode
//   hub.onState((s) => console.log(s.state));
//   hub.onTopic("/project/1/push", (event) => console.log(event.id, event.payload));
//   await hub.subscribe("/project/1/push");
//   const reply = await hub.send("ping");                 // settled by the reply carrying the same id
//
// The reconnect rules (close codes, backoff, jitter) and the per-topic bookkeeping (last event id, dedupe) are pure
// exported functions and classes, unit-tested with Node's test runner without a browser or a WebSocket.

// ---------------------------------------------------------------------------------------------------------------
// Close codes and reconnect planning (pure)
// ---------------------------------------------------------------------------------------------------------------

/** What tabhub's close codes mean and what the client does on each (docs/protocol.md, "Close codes"; docs/client.md, "Reconnection by close code"). */
export const CLOSE_CODES = Object.freeze({
  1000: { name: "normal closure", decision: "backoff" },
  1001: { name: "going away", decision: "backoff" },
  1005: { name: "no status", decision: "backoff" },
  1006: { name: "abnormal closure (network)", decision: "backoff" },
  1009: { name: "message too big", decision: "backoff" },
  1011: { name: "internal error", decision: "backoff" },
  1012: { name: "server restarting or draining", decision: "quick" },
  1013: { name: "overloaded or not ready", decision: "backoff" },
  4000: { name: "no credential", decision: "reauth" },
  4001: { name: "invalid token", decision: "stop" },
  4002: { name: "token expired and not renewed", decision: "reauth" },
  4003: { name: "logged out", decision: "stop" },
  4008: { name: "too many commands", decision: "backoff" },
  4009: { name: "outbound queue full", decision: "backoff" },
  4029: { name: "too many tabs for this user", decision: "backoff" },
});

/** Reconnect settings; every one can be overridden in the options of {@link connect}. */
export const DEFAULTS = Object.freeze({
  /** First backoff window (ms); the window doubles (`factor`) per failed attempt up to `capMs`. */
  baseMs: 500,
  factor: 2,
  capMs: 30000,
  /** After 1012 (server restarting): reconnect after random(0, quickMaxMs), once; backoff if it happens again. */
  quickMaxMs: 1000,
  /** A connection up this long resets the backoff (and re-arms the quick reconnect). */
  stableMs: 10000,
  /** Consecutive credential refusals (4000, 4002) before giving up with "needLogin". */
  maxAuthRetries: 3,
  /** How long `send` waits for the reply carrying its id. */
  requestTimeoutMs: 10000,
});

/**
 * What to do after a close: "backoff" (exponential, full jitter), "quick" (short random delay: 1012),
 * "reauth" (fresh credential, then reconnect: 4000, 4002) or "stop" (4001 invalid token, 4003 logged out).
 * Unknown codes back off.
 */
export function closeDecision(code) {
  const known = CLOSE_CODES[code];
  return known ? known.decision : "backoff";
}

/**
 * Full-jitter exponential backoff: random(0, min(cap, base * factor^attempt)). The jitter spreads over the whole
 * window even once the window reached the cap, so clients never fall back into lockstep.
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const { baseMs, factor, capMs } = { ...DEFAULTS, ...opts };
  const n = Math.max(0, Math.min(Number(attempt) || 0, 64));
  const window = Math.min(capMs, baseMs * Math.pow(factor, n));
  return Math.floor(clamp01(random()) * window);
}

/** Random numbers outside [0, 1) (a bad injected generator) must not escape the window. */
function clamp01(x) {
  if (!(x >= 0)) return 0;
  return x >= 1 ? 0.999999 : x;
}

/** The reconnect state of a client that has not failed yet. */
export function initialReconnectState() {
  return { attempt: 0, quickUsed: false, authRetries: 0 };
}

/**
 * Plans the reconnection after a close with `code`: `{decision, delay, reason, state}`; `delay` is null when the
 * decision is "stop", and `reason` then says why: "loggedOut" (4003), "invalidToken" (4001) or "needLogin"
 * (credentials refused `maxAuthRetries` times in a row). `state` is the next reconnect state; reset it with
 * {@link initialReconnectState} once a connection has stayed up `stableMs`.
 */
export function planReconnect(code, state = initialReconnectState(), opts = {}, random = Math.random) {
  const o = { ...DEFAULTS, ...opts };
  const decision = closeDecision(code);
  if (decision === "stop") {
    const reason = code === 4003 ? "loggedOut" : code === 4001 ? "invalidToken" : "stopped";
    return { decision, delay: null, reason, state };
  }
  if (decision === "quick" && !state.quickUsed) {
    return {
      decision,
      delay: Math.floor(clamp01(random()) * o.quickMaxMs),
      reason: "restart",
      state: { ...state, quickUsed: true },
    };
  }
  if (decision === "reauth") {
    if (state.authRetries >= o.maxAuthRetries) {
      return { decision: "stop", delay: null, reason: "needLogin", state };
    }
    return {
      decision,
      delay: backoffDelay(state.attempt, o, random),
      reason: code === 4002 ? "expired" : "missing",
      state: { ...state, attempt: state.attempt + 1, authRetries: state.authRetries + 1 },
    };
  }
  // "backoff", and a repeated 1012 (the restart is taking longer: back off like any failure).
  return {
    decision: "backoff",
    delay: backoffDelay(state.attempt, o, random),
    reason: decision === "quick" ? "restart" : "reconnect",
    state: { ...state, attempt: state.attempt + 1 },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Topics: last event id per topic, dedupe (pure)
// ---------------------------------------------------------------------------------------------------------------

/** `/project/<id>/<eventType>` -> `{project, eventType}`, or null for another form. */
export function parseTopic(topic) {
  const m = /^\/project\/([^/]+)\/([^/]+)$/.exec(String(topic));
  return m ? { project: m[1], eventType: m[2] } : null;
}

function numeric(id) {
  return typeof id === "string" && /^\d+$/.test(id) ? Number(id) : null;
}

/** The later of two event ids: numerically when both are numbers, else the newer one (`b`). */
function later(a, b) {
  if (a == null) return b;
  if (b == null) return a;
  const na = numeric(a);
  const nb = numeric(b);
  return na != null && nb != null && na > nb ? a : b;
}

/**
 * The topics a client wants, and per topic where it stands: the position to resume from (`lastEventId`) and the
 * ids recently seen (dedupe).
 *
 * The position of a topic is its last event id. A topic that has seen no event yet has none, unless it was
 * subscribed with an explicit `lastEventId`; then tabhub's per-project ids help: event ids are per project and
 * shared by every event type (GitLab's), and after a `subscribed` reply a topic subscribed "from now on" receives
 * its project's events in id order, so every event of its project received after that reply (on any topic of the
 * tab) moves its position too. A quiet topic thus still resumes from the right place after a reconnect.
 */
export class TopicTracker {
  constructor({ maxIds = 1000 } = {}) {
    this.maxIds = maxIds;
    /** topic -> {position, live, confirmed, seen: Set, order: []} */
    this.map = new Map();
  }

  has(topic) {
    return this.map.has(topic);
  }

  topics() {
    return [...this.map.keys()];
  }

  /** Wants `topic`; `lastEventId` (optional) is where it resumes from. Keeps the state of a topic already held. */
  add(topic, lastEventId) {
    let t = this.map.get(topic);
    if (!t) {
      t = { position: null, live: false, confirmed: false, seen: new Set(), order: [] };
      this.map.set(topic, t);
    }
    if (lastEventId != null && lastEventId !== "") t.position = String(lastEventId);
    return t;
  }

  remove(topic) {
    return this.map.delete(topic);
  }

  /** Where `topic` resumes from (a string), or undefined. */
  lastEventId(topic) {
    const t = this.map.get(topic);
    return t && t.position != null ? t.position : undefined;
  }

  /** A subscribe for `topic` is being sent; `live`: without a lastEventId ("from now on"). */
  sending(topic, live) {
    const t = this.map.get(topic);
    if (t) {
      t.live = live;
      t.confirmed = false;
    }
  }

  /** tabhub confirmed the subscription (`subscribed`, or `setSubscriptions`'s reply). */
  confirm(topic, live) {
    const t = this.map.get(topic);
    if (t) {
      t.confirmed = true;
      if (live !== undefined) t.live = live;
    }
  }

  /** The connection closed: nothing is confirmed any more. */
  resetConnection() {
    for (const t of this.map.values()) {
      t.confirmed = false;
      t.live = false;
    }
  }

  /**
   * The subscriptions to send after a (re)connect: `[{topic, lastEventId?}]`, the oldest positions first (topics
   * without one last).
   */
  resubscriptions() {
    const list = [...this.map.entries()].map(([topic, t]) =>
      t.position != null ? { topic, lastEventId: t.position } : { topic },
    );
    const rank = (e) => (e.lastEventId == null ? Infinity : (numeric(e.lastEventId) ?? -1));
    return list.sort((a, b) => rank(a) - rank(b));
  }

  /**
   * An event `id` arrived on `topic`. Returns false when it is a repeat (already seen on this topic), true
   * otherwise; moves the positions.
   */
  accept(topic, id) {
    const t = this.map.get(topic);
    if (!t) return true;
    if (id == null || id === "") return true;
    id = String(id);
    if (t.seen.has(id)) return false;
    t.seen.add(id);
    t.order.push(id);
    if (t.order.length > this.maxIds) t.seen.delete(t.order.shift());
    t.position = later(t.position, id);
    const parsed = parseTopic(topic);
    if (parsed && numeric(id) != null) {
      for (const [other, o] of this.map) {
        if (other === topic || !o.confirmed || !o.live) continue;
        const p = parseTopic(other);
        if (p && p.project === parsed.project) o.position = later(o.position, id);
      }
    }
    return true;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------------------------

/** A request that failed: `kind` "server" (tabhub replied `error`; `data` holds it), "timeout" or "closed". */
export class TabHubError extends Error {
  constructor(message, kind, data) {
    super(message);
    this.name = "TabHubError";
    this.kind = kind;
    this.data = data;
  }
}

/** `ws(s)://<host>/ws` of the page's origin, or `url` made absolute (http(s) becomes ws(s)). */
export function websocketUrl(url, location = globalThis.location) {
  const base = location && location.href ? location.href : undefined;
  const u = new URL(url || "/ws", base);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  return u.toString();
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {});
  return { promise, resolve, reject };
}

const OPEN = 1;

export class TabHubClient {
  /** See {@link connect} for the options. */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.url = websocketUrl(options.url);
    this.mode = options.token != null ? "token" : "cookie";
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.fetch = options.fetch || (globalThis.fetch ? globalThis.fetch.bind(globalThis) : null);
    this.random = options.random || Math.random;
    this.document = options.document !== undefined ? options.document : globalThis.document;
    const httpUrl = new URL(this.url);
    httpUrl.protocol = httpUrl.protocol === "wss:" ? "https:" : "http:";
    this.meUrl = new URL(options.meUrl || "/auth/me", httpUrl).toString();

    /** "idle" | "connecting" | "open" | "waiting" | "stopped" */
    this.state = "idle";
    /** The `init` message's data of the current connection: {user, instance, message}. */
    this.info = null;
    this.stats = { connects: 0, reconnects: 0, duplicates: 0, tokenRequests: 0 };
    this.tracker = new TopicTracker();

    this._ws = null;
    this._gen = 0;
    this._rs = initialReconnectState();
    this._timer = null;
    this._stableTimer = null;
    this._nextId = 1;
    this._pending = new Map();
    this._queue = [];
    this._handlers = new Map();
    this._topicHandlers = new Map();
    this._stateHandlers = new Set();
    this._resubscribed = deferred();
    this._onVisibility = () => {
      if (this.state === "open" && this.document) this.post("visibility", { hidden: !!this.document.hidden });
    };
  }

  // ---- public API ----

  /** Starts connecting (again, after a stop). */
  start() {
    if (this.state !== "idle" && this.state !== "stopped") return this;
    this._closedByUser = false;
    this._rs = initialReconnectState();
    if (this.document && this.options.visibility !== false && this.document.addEventListener) {
      this.document.addEventListener("visibilitychange", this._onVisibility); // idempotent
    }
    this._connect("connect");
    return this;
  }

  /** Closes for good: no reconnection. Pending requests reject with kind "closed". */
  close() {
    this._closedByUser = true;
    clearTimeout(this._timer);
    clearTimeout(this._stableTimer);
    this._gen++;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    if (this.document && this.document.removeEventListener) {
      this.document.removeEventListener("visibilitychange", this._onVisibility);
    }
    this._failAll("closed by the application");
    this._setState("stopped", { reason: "closed" });
  }

  /** Resolves when the connection is open (at once if it is), rejects if the client stops first. */
  ready() {
    if (this.state === "open") return Promise.resolve(this.info);
    if (this.state === "stopped") return Promise.reject(new TabHubError("stopped", "closed"));
    return new Promise((resolve, reject) => {
      const off = this.onState((s) => {
        if (s.state === "open") {
          off();
          resolve(this.info);
        } else if (s.state === "stopped") {
          off();
          reject(new TabHubError(`stopped: ${s.reason}`, "closed", s));
        }
      });
    });
  }

  /**
   * Sends a command with a fresh `id`; resolves with the reply carrying that id (`{type, data, id, ...}`), rejects
   * with a {@link TabHubError}: kind "server" when the reply is `error`, "timeout", or "closed" when the connection
   * closes first. Sent at once when open, else when the connection opens (within the timeout).
   */
  send(type, data = {}, { timeoutMs } = {}) {
    const id = this._nextId++;
    const frame = { timestamp: new Date().toISOString(), type, data, id };
    return new Promise((resolve, reject) => {
      const timeout = timeoutMs ?? this.options.requestTimeoutMs;
      const timer = setTimeout(() => {
        this._pending.delete(id);
        this._queue = this._queue.filter((f) => f.id !== id);
        reject(new TabHubError(`no reply to '${type}' within ${timeout} ms`, "timeout"));
      }, timeout);
      this._pending.set(id, { resolve, reject, timer, type, data });
      this._transmit(frame);
    });
  }

  /** Sends a command (with an id) without waiting for a reply: for commands that reply nothing (`visibility`). */
  post(type, data = {}) {
    this._transmit({ timestamp: new Date().toISOString(), type, data, id: this._nextId++ });
  }

  /**
   * Subscribes to `topic`, resuming after `lastEventId` when given. The topic is kept: after every reconnect it is
   * subscribed again from its last seen event id. Resolves with `subscribed`'s data `{topic, added}`.
   */
  subscribe(topic, { lastEventId } = {}) {
    this.tracker.add(topic, lastEventId);
    if (this.state === "open") return this._subscribeNow(topic);
    return this._resubscribed.promise.then((results) => {
      const r = results.get(topic);
      if (!r) return { topic, added: false };
      if (r.error) throw r.error;
      return r.data;
    });
  }

  /** Stops `topic` for this tab and forgets it. Resolves with `unsubscribed`'s data `{topic, removed}`. */
  async unsubscribe(topic) {
    this.tracker.remove(topic);
    if (this.state !== "open") return { topic, removed: false };
    const reply = await this.send("unsubscribe", { topic });
    return reply.data;
  }

  /**
   * Replaces the whole set of topics. Resolves with `subscriptions`'s data `{added, removed, topics, failed}` (when
   * not connected, with `{topics}` once the next connection subscribed them). Topics that failed are forgotten.
   */
  async setSubscriptions(topics) {
    const wanted = new Set(topics);
    for (const t of this.tracker.topics()) if (!wanted.has(t)) this.tracker.remove(t);
    for (const t of wanted) this.tracker.add(t);
    if (this.state !== "open") {
      await this._resubscribed.promise;
      return { topics: this.tracker.topics() };
    }
    // setSubscriptions subscribes new topics "from now on".
    for (const t of wanted) if (!this._isConfirmed(t)) this.tracker.sending(t, true);
    const reply = await this.send("setSubscriptions", { topics: [...wanted] });
    const d = reply.data || {};
    for (const t of d.topics || []) if (this.tracker.has(t)) this.tracker.confirm(t);
    for (const f of d.failed || []) this.tracker.remove(f.topic);
    return d;
  }

  /** The topics kept (subscribed again after every reconnect). */
  get topics() {
    return this.tracker.topics();
  }

  /** The last event id seen on `topic` (where it resumes from), or undefined. */
  lastEventId(topic) {
    return this.tracker.lastEventId(topic);
  }

  /** Calls `handler(data, message)` for every server message of `type` ("*": every message). Returns `off()`. */
  on(type, handler) {
    return addTo(this._handlers, type, handler);
  }

  /**
   * Calls `handler(event, message)` for every event of `topic` (`event`: `{topic, eventType, id, payload}`), each
   * id once. Returns `off()`.
   */
  onTopic(topic, handler) {
    return addTo(this._topicHandlers, topic, handler);
  }

  /**
   * Calls `handler({state, ...})` on every state change: "connecting", "open" (`info`), "waiting" (`code`,
   * `decision`, `delay` before the next attempt), "stopped" (`reason`: "closed", "loggedOut", "invalidToken",
   * "needLogin"). Returns `off()`.
   */
  onState(handler) {
    this._stateHandlers.add(handler);
    return () => this._stateHandlers.delete(handler);
  }

  // ---- internals ----

  _setState(state, detail = {}) {
    const previous = this.state;
    this.state = state;
    const s = { state, previous, ...detail };
    for (const h of [...this._stateHandlers]) safely(h, s);
  }

  _isConfirmed(topic) {
    const t = this.tracker.map.get(topic);
    return !!(t && t.confirmed);
  }

  _transmit(frame) {
    if (this.state === "open" && this._ws && this._ws.readyState === OPEN) {
      this._ws.send(JSON.stringify(frame));
      const p = this._pending.get(frame.id);
      if (p) p.sent = true;
    } else {
      this._queue.push(frame);
    }
  }

  _subscribeNow(topic) {
    const last = this.tracker.lastEventId(topic);
    const data = last != null ? { topic, lastEventId: last } : { topic };
    this.tracker.sending(topic, last == null);
    return this.send("subscribe", data).then(
      (reply) => reply.data,
      (err) => {
        if (err.kind === "server") this.tracker.remove(topic);
        throw err;
      },
    );
  }

  async _resubscribeAll() {
    const done = this._resubscribed;
    this._resubscribed = deferred();
    const results = new Map();
    await Promise.all(
      this.tracker.resubscriptions().map(({ topic }) =>
        this._subscribeNow(topic).then(
          (data) => results.set(topic, { data }),
          (error) => results.set(topic, { error }),
        ),
      ),
    );
    done.resolve(results);
  }

  async _credential(reason) {
    if (this.mode === "token") {
      const t = this.options.token;
      this.stats.tokenRequests++;
      return typeof t === "function" ? await t({ reason }) : t;
    }
    // Cookie mode: after a refused credential, ask whether the login (server-side session) still exists.
    if ((reason === "missing" || reason === "expired") && this.fetch) {
      const r = await this.fetch(this.meUrl, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) return null;
      if (!r.ok) throw new Error(`${this.meUrl}: HTTP ${r.status}`);
    }
    return "";
  }

  async _connect(reason) {
    const gen = ++this._gen;
    this._setState("connecting", { reason });
    let credential;
    try {
      credential = await this._credential(reason);
    } catch (e) {
      if (gen !== this._gen) return;
      this._afterClose(1006, `credential: ${e && e.message ? e.message : e}`);
      return;
    }
    if (gen !== this._gen) return;
    if (credential == null || (this.mode === "token" && !credential)) {
      this._stop("needLogin", null);
      return;
    }
    let ws;
    try {
      ws =
        this.mode === "token"
          ? new this.WebSocket(this.url, ["tabhub", "tabhub.bearer." + credential])
          : new this.WebSocket(this.url, ["tabhub"]);
    } catch (e) {
      this._afterClose(1006, String(e && e.message ? e.message : e));
      return;
    }
    this._ws = ws;
    this.stats.connects++;
    if (reason !== "connect") this.stats.reconnects++;
    ws.onmessage = (e) => {
      if (gen === this._gen) this._onMessage(e.data);
    };
    ws.onclose = (e) => {
      if (gen !== this._gen) return;
      this._ws = null;
      this._afterClose(e.code, e.reason || "");
    };
    ws.onerror = () => {};
  }

  _onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    const { type, data = {}, id } = msg;

    if (type === "init" && this.state !== "open") {
      this._onOpen(data);
    } else if (type === "subscribed" && data.topic) {
      this.tracker.confirm(data.topic);
    } else if (type === "subscriptionError" && data.topic && (data.status === 403 || data.status === 404)) {
      this.tracker.remove(data.topic); // tabhub dropped it
    } else if (type === "authExpiring" && this.mode === "token") {
      this._renewToken();
    }

    if (type === "event" && data.topic != null) {
      if (!this.tracker.accept(data.topic, data.id)) {
        this.stats.duplicates++;
        return;
      }
      const hs = this._topicHandlers.get(data.topic);
      if (hs) for (const h of [...hs]) safely(h, data, msg);
    }

    if (id != null && this._pending.has(id)) {
      const p = this._pending.get(id);
      this._pending.delete(id);
      clearTimeout(p.timer);
      if (type === "error") p.reject(new TabHubError(data.message || "error", "server", data));
      else p.resolve(msg);
    }
    dispatch(this._handlers.get(type), data, msg);
    dispatch(this._handlers.get("*"), data, msg);
  }

  _onOpen(info) {
    this.info = info;
    this._rs = { ...this._rs, authRetries: 0 };
    clearTimeout(this._stableTimer);
    this._stableTimer = setTimeout(() => {
      this._rs = initialReconnectState();
    }, this.options.stableMs);
    this._setState("open", { info });
    if (this.document && this.document.hidden && this.options.visibility !== false) {
      this.post("visibility", { hidden: true });
    }
    this._resubscribeAll();
    const queued = this._queue;
    this._queue = [];
    for (const f of queued) this._transmit(f);
  }

  async _renewToken() {
    try {
      this.stats.tokenRequests++;
      const t = this.options.token;
      const token = typeof t === "function" ? await t({ reason: "expiring" }) : t;
      if (token && this.state === "open") await this.send("authenticate", { token });
    } catch {
      // The server closes with 4002 when the token expires; the reconnect asks the getter again.
    }
  }

  _afterClose(code, reason) {
    clearTimeout(this._stableTimer);
    this.tracker.resetConnection();
    this._failPending(`connection closed (${code})`);
    if (this._closedByUser) return;
    const plan = planReconnect(code, this._rs, this.options, this.random);
    this._rs = plan.state;
    if (plan.decision === "stop") {
      this._stop(plan.reason, code);
      return;
    }
    this._setState("waiting", { code, closeReason: reason, decision: plan.decision, delay: plan.delay });
    clearTimeout(this._timer);
    const next = plan.decision === "reauth" ? plan.reason : "reconnect";
    this._timer = setTimeout(() => this._connect(next), plan.delay);
  }

  _stop(reason, code) {
    clearTimeout(this._timer);
    clearTimeout(this._stableTimer);
    this._gen++;
    this._failAll(`stopped: ${reason}`);
    this._setState("stopped", { reason, code });
  }

  /** The connection closed: requests already sent will get no reply; those still queued wait for the next one. */
  _failPending(message) {
    for (const [id, p] of this._pending) {
      if (!p.sent) continue;
      clearTimeout(p.timer);
      this._pending.delete(id);
      p.reject(new TabHubError(message, "closed"));
    }
  }

  _failAll(message) {
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new TabHubError(message, "closed"));
    }
    this._pending.clear();
    this._queue = [];
    this._resubscribed.reject(new TabHubError(message, "closed"));
    this._resubscribed = deferred();
  }
}

function addTo(map, key, handler) {
  let set = map.get(key);
  if (!set) map.set(key, (set = new Set()));
  set.add(handler);
  return () => set.delete(handler);
}

function dispatch(set, data, msg) {
  if (set) for (const h of [...set]) safely(h, data, msg);
}

function safely(fn, ...args) {
  try {
    fn(...args);
  } catch (e) {
    // A failing handler must not break the client nor the other handlers: report it and go on.
    (globalThis.reportError || console.error)(e);
  }
}

/**
 * Connects to tabhub and keeps the connection up. Options (all optional):
 *
 * - `url`: websocket URL (default `ws(s)://<page host>/ws`);
 * - `token`: a token string, or a getter `({reason}) => token | Promise<token>` called before every connection
 *   (`reason`: "connect", "reconnect", "missing" after 4000, "expired" after 4002) and on `authExpiring`
 *   ("expiring"). With it the client runs in token mode (subprotocols `["tabhub", "tabhub.bearer." + token]`);
 *   without it in cookie mode (the HttpOnly session cookie of token custody goes with the same-origin upgrade,
 *   and after 4000/4002 the client asks `meUrl` whether the login still holds);
 * - `meUrl` (default `/auth/me`), `requestTimeoutMs`, `baseMs`, `factor`, `capMs`, `quickMaxMs`, `stableMs`,
 *   `maxAuthRetries` (see {@link DEFAULTS});
 * - `visibility` (default true): send `visibility {hidden}` on `visibilitychange`;
 * - `WebSocket`, `fetch`, `document`, `random`: injections for tests.
 */
export function connect(options = {}) {
  return new TabHubClient(options).start();
}

export default { connect, TabHubClient, TabHubError };
