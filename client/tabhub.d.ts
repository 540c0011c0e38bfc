// TypeScript declarations of tabhub's browser client (/client/tabhub.js).

/** What the client does after a close. */
export type CloseDecision = "backoff" | "quick" | "reauth" | "stop";

/** Why a client stopped for good. */
export type StopReason = "closed" | "loggedOut" | "invalidToken" | "needLogin";

export type ConnectionState = "idle" | "connecting" | "open" | "waiting" | "stopped";

/** Why the token getter is called. */
export type TokenReason = "connect" | "reconnect" | "missing" | "expired" | "expiring";

/** A server message: Renku's envelope. */
export interface Message<D = Record<string, any>> {
  timestamp: string;
  scope: "user" | "topic" | string;
  type: string;
  data: D;
  id?: string | number;
}

/** The data of the `init` message tabhub sends right after connecting. */
export interface InitInfo {
  message: string;
  user: string;
  instance: string;
}

/** An `event` message's data. */
export interface TopicEvent<P = any> {
  topic: string;
  eventType: string;
  id: string;
  payload: P;
}

export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
  /** "connecting": why ("connect", "reconnect", "missing", "expired"). "stopped": a {@link StopReason}. */
  reason?: string;
  /** "open": the init data. */
  info?: InitInfo;
  /** "waiting" and "stopped": the close code. */
  code?: number | null;
  closeReason?: string;
  /** "waiting": what was decided and the delay (ms) before the next attempt. */
  decision?: CloseDecision;
  delay?: number;
}

export interface ReconnectOptions {
  /** First backoff window, ms (500). */
  baseMs?: number;
  /** Growth of the window per failed attempt (2). */
  factor?: number;
  /** Largest window, ms (30000). */
  capMs?: number;
  /** Window of the single quick reconnect after 1012, ms (1000). */
  quickMaxMs?: number;
  /** A connection up this long resets the backoff, ms (10000). */
  stableMs?: number;
  /** Consecutive credential refusals (4000/4002) before stopping with "needLogin" (3). */
  maxAuthRetries?: number;
}

export interface ConnectOptions extends ReconnectOptions {
  /** Websocket URL; default `ws(s)://<page host>/ws`. http(s) URLs are turned into ws(s). */
  url?: string;
  /**
   * Token mode: a token, or a getter called before every connection and on `authExpiring`. Without it: cookie mode
   * (token custody's HttpOnly session cookie, same origin).
   */
  token?: string | ((ctx: { reason: TokenReason }) => string | null | undefined | Promise<string | null | undefined>);
  /** Cookie mode: where the login is re-checked after 4000/4002 (`/auth/me`). */
  meUrl?: string;
  /** How long `send` waits for its reply, ms (10000). */
  requestTimeoutMs?: number;
  /** Send `visibility {hidden}` on `visibilitychange` (true). */
  visibility?: boolean;
  /** Injections, for tests. */
  WebSocket?: any;
  fetch?: typeof fetch;
  document?: Pick<Document, "hidden" | "addEventListener" | "removeEventListener"> | null;
  random?: () => number;
}

export declare class TabHubError extends Error {
  /** "server": tabhub replied `error` (see `data`); "timeout"; "closed": the connection closed or the client stopped. */
  kind: "server" | "timeout" | "closed";
  data?: any;
}

export declare class TabHubClient {
  constructor(options?: ConnectOptions);
  readonly state: ConnectionState;
  readonly mode: "token" | "cookie";
  readonly url: string;
  /** The init data of the current connection. */
  readonly info: InitInfo | null;
  readonly stats: { connects: number; reconnects: number; duplicates: number; tokenRequests: number };
  /** The topics kept: subscribed again after every reconnect. */
  readonly topics: string[];

  /** Starts connecting (again, after a stop). */
  start(): this;
  /** Closes for good. */
  close(): void;
  /** Resolves when open (with the init data); rejects if the client stops first. */
  ready(): Promise<InitInfo>;

  /** Sends a command with a fresh id; settled by the reply carrying that id (rejects on `error`, timeout, close). */
  send<D = Record<string, any>>(type: string, data?: Record<string, any>, opts?: { timeoutMs?: number }): Promise<Message<D>>;
  /** Sends a command (with an id) without waiting: for commands that reply nothing (`visibility`, `pullSessionStatusV2`). */
  post(type: string, data?: Record<string, any>): void;

  /** Subscribes and keeps the topic; resumes after `lastEventId` when given. */
  subscribe(topic: string, opts?: { lastEventId?: string }): Promise<{ topic: string; added: boolean }>;
  unsubscribe(topic: string): Promise<{ topic: string; removed: boolean }>;
  /** Replaces every topic; topics that failed are forgotten. */
  setSubscriptions(topics: string[]): Promise<{
    added?: string[];
    removed?: string[];
    topics: string[];
    failed?: { topic: string; message: string }[];
  }>;
  /** The last event id seen on a topic (where it resumes from). */
  lastEventId(topic: string): string | undefined;

  /** Server messages by type ("*": all). Returns a function removing the handler. */
  on<D = Record<string, any>>(type: string, handler: (data: D, message: Message<D>) => void): () => void;
  /** Events of a topic, each id once. */
  onTopic<P = any>(topic: string, handler: (event: TopicEvent<P>, message: Message<TopicEvent<P>>) => void): () => void;
  /** Every state change. */
  onState(handler: (change: StateChange) => void): () => void;
}

/** Creates a client and starts connecting. */
export declare function connect(options?: ConnectOptions): TabHubClient;

// ---- the pure logic, exported for tests ----

export declare const CLOSE_CODES: Readonly<Record<number, { name: string; decision: CloseDecision }>>;
export declare const DEFAULTS: Readonly<Required<ReconnectOptions> & { requestTimeoutMs: number }>;

export interface ReconnectState {
  attempt: number;
  quickUsed: boolean;
  authRetries: number;
}

export declare function closeDecision(code: number): CloseDecision;
/** random(0, min(capMs, baseMs * factor^attempt)). */
export declare function backoffDelay(attempt: number, opts?: ReconnectOptions, random?: () => number): number;
export declare function initialReconnectState(): ReconnectState;
export declare function planReconnect(
  code: number,
  state?: ReconnectState,
  opts?: ReconnectOptions,
  random?: () => number,
): { decision: CloseDecision; delay: number | null; reason: string; state: ReconnectState };
export declare function parseTopic(topic: string): { project: string; eventType: string } | null;
export declare function websocketUrl(url?: string, location?: { href: string }): string;

export declare class TopicTracker {
  constructor(opts?: { maxIds?: number });
  has(topic: string): boolean;
  topics(): string[];
  add(topic: string, lastEventId?: string): void;
  remove(topic: string): boolean;
  lastEventId(topic: string): string | undefined;
  sending(topic: string, live: boolean): void;
  confirm(topic: string, live?: boolean): void;
  resetConnection(): void;
  resubscriptions(): { topic: string; lastEventId?: string }[];
  /** False when `id` was already seen on `topic`. */
  accept(topic: string, id: string): boolean;
}

declare const _default: { connect: typeof connect; TabHubClient: typeof TabHubClient; TabHubError: typeof TabHubError };
export default _default;
