//! The per-project event history of the webhook source: ids, duplicates, replay.
//!
//! A webhook reaches one instance; its event must get **one id, the same on every instance**, so that a tab that
//! reconnects to another instance resumes with its `lastEventId` without loss or repeat. Ids are per project,
//! consecutive integers (so clients compare them as numbers, as the SSE source's), assigned once. A project's first
//! id is the time in milliseconds times 1000 ([`epoch_base`]): a history lost (a restart with the memory broker,
//! an evicted project, an expired Redis key) starts again above every id it gave, so clients never take new events
//! for repeats of old ones, and a resume from an old id is told `gap`. Assigned:
//!
//! - memory broker: in this process ([`History::append_local`]), one lock per project held while the event is
//!   delivered, so every tab sees a project's events in id order;
//! - Redis: one script ([`APPEND`]) drops a delivery seen before (its key, `SET PX`), takes the project's next id
//!   (`INCR`), appends to the project's stream (`XADD ... MAXLEN ~ hooks.history_events`) and publishes the event on
//!   the broker channel, atomically: every instance receives a project's events in id order. A replay reads the
//!   stream (`XRANGE`).
//!
//! Lock order: a project's log (memory), then a session, then a tab.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::{BrokerKind, Config, HooksConfig};
use crate::protocol;

/// A webhook's event as it travels between instances and is kept in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookEvent {
    /// GitLab's project id (`project.id` / `project_id`), as topics name it.
    pub project: String,
    /// GitLab's `object_kind`: the topic's event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// A confidential issue or note: only users with `access.confidential_min_level` see it.
    #[serde(default)]
    pub confidential: bool,
    pub payload: Value,
}

/// An event with its id.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: u64,
    pub event: Arc<HookEvent>,
}

impl Stored {
    /// The message tabs receive: `event {topic, eventType, id, payload}`, as from the SSE source.
    pub fn encode(&self) -> Utf8Bytes {
        let e = &self.event;
        protocol::encode_scoped(
            "topic",
            "event",
            &json!({
                "topic": format!("/project/{}/{}", e.project, e.event_type),
                "eventType": e.event_type,
                "id": self.id.to_string(),
                "payload": e.payload,
            }),
            None,
        )
    }
}

/// A delivery's identity: the SHA-256 of its `Idempotency-Key`, else of its body.
pub type DeliveryKey = [u8; 32];

/// What a replay found after an id.
#[derive(Debug, Default)]
pub struct Replay {
    pub events: Vec<Stored>,
    /// Some events after the id are gone (older than the history, or an id from before the history was lost).
    pub gap: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("the event history (Redis) is unavailable: {0}")]
    Unavailable(String),
}

/// The Redis side of [`History`]: appends and publishes an event once per delivery key. Returns the id, or 0 for a
/// delivery seen before. A counter lost while its stream lived on (eviction) resumes after the stream's last id.
/// The delivery key is set last: a script is atomic for other clients but a failed command does not undo the
/// earlier ones, so a delivery that failed half-way is not taken for a duplicate when GitLab retries it.
pub const APPEND: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[6]) end
local n = redis.call('INCR', KEYS[3])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
  local l = tonumber(string.match(last[1][1], '%-(%d+)$'))
  if l and n <= l then n = l + 1; redis.call('SET', KEYS[3], string.format('%.0f', n)) end
end
-- Lua numbers are doubles: written with %.0f, never as 1.7e+15.
local id = string.format('%.0f', n)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. id, 'e', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[5], 'H' .. id .. ' ' .. ARGV[4])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return n
";

/// Reads a project's last id and the events after an id.
const READ: &str = r"
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local entries = redis.call('XRANGE', KEYS[1], '(0-' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {seq, entries}
";

/// A message published by [`APPEND`] on the broker channel: `H<id> <event JSON>`. None when `payload` is not one.
pub fn parse_published(payload: &str) -> Option<Result<Stored, serde_json::Error>> {
    let rest = payload.strip_prefix('H')?;
    let (id, json) = rest.split_once(' ')?;
    let id = id.parse().ok()?;
    Some(serde_json::from_str::<HookEvent>(json).map(|e| Stored {
        id,
        event: Arc::new(e),
    }))
}

/// Where a project's ids start (the first is one more): milliseconds since 1970 times 1000, so that a project's
/// history started again later starts above the ids it gave before (fewer than 1000 events per millisecond on
/// average), and below 2^53 until the year 2255 (JavaScript's exact integers).
pub fn epoch_base() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    ms.saturating_mul(1000)
}

#[derive(Default)]
struct ProjectLog {
    last_id: u64,
    events: VecDeque<Stored>,
}

struct Redis {
    client: redis::Client,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    timeout: Duration,
    channel: String,
}

pub struct History {
    config: HooksConfig,
    /// Memory broker: each project's log, the least recently used dropped beyond `hooks.max_projects`.
    logs: moka::sync::Cache<String, Arc<Mutex<ProjectLog>>>,
    /// Memory broker: deliveries seen lately.
    seen: moka::sync::Cache<DeliveryKey, ()>,
    redis: Option<Redis>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn replay_from(events: impl Iterator<Item = Stored>, after: u64, last: u64) -> Replay {
    // An id beyond the last one comes from a history since lost: everything kept is new to the tab.
    let (after, lost) = if after > last {
        (0, true)
    } else {
        (after, false)
    };
    let events: Vec<Stored> = events.filter(|s| s.id > after).collect();
    let first_missing = match events.first() {
        Some(s) => s.id > after + 1,
        None => last > after,
    };
    Replay {
        gap: lost || first_missing,
        events,
    }
}

impl History {
    pub fn new(config: &Config) -> History {
        let h = &config.hooks;
        let redis = (config.broker.kind == BrokerKind::Redis)
            .then(|| redis::Client::open(config.broker.redis_url.as_str()).ok())
            .flatten()
            .map(|client| Redis {
                client,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                timeout: Duration::from_millis(config.broker.timeout_ms),
                channel: config.broker.channel.clone(),
            });
        History {
            config: h.clone(),
            logs: moka::sync::Cache::builder()
                .max_capacity(h.max_projects)
                .build(),
            seen: moka::sync::Cache::builder()
                .max_capacity(h.dedupe_max_keys)
                .time_to_live(Duration::from_millis(h.dedupe_ttl_ms))
                .build(),
            redis,
        }
    }

    fn key(&self, what: &str, project: &str) -> String {
        format!("{}{what}:{project}", self.config.redis_prefix)
    }

    /// Memory broker: gives the event its project's next id and hands it to `deliver` under the project's lock
    /// (so deliveries follow ids). None for a delivery seen within `hooks.dedupe_ttl_ms`.
    pub fn append_local(
        &self,
        event: HookEvent,
        key: DeliveryKey,
        deliver: impl FnOnce(&Stored),
    ) -> Option<u64> {
        let entry = self.seen.entry(key).or_insert(());
        if !entry.is_fresh() {
            return None;
        }
        let log = self.logs.get_with(event.project.clone(), || {
            Arc::new(Mutex::new(ProjectLog {
                last_id: epoch_base(),
                events: VecDeque::new(),
            }))
        });
        let mut log = lock(&log);
        log.last_id += 1;
        let stored = Stored {
            id: log.last_id,
            event: Arc::new(event),
        };
        if log.events.len() >= self.config.history_events {
            log.events.pop_front();
        }
        log.events.push_back(stored.clone());
        deliver(&stored);
        Some(stored.id)
    }

    /// Redis: appends and publishes the event to every instance (see [`APPEND`]). None for a delivery seen before.
    pub async fn append_shared(
        &self,
        event: &HookEvent,
        key: DeliveryKey,
    ) -> Result<Option<u64>, HistoryError> {
        let r = self.redis()?;
        let json =
            serde_json::to_string(event).map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let mut hex = String::with_capacity(64);
        for b in key {
            hex.push_str(&format!("{b:02x}"));
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPEND)
            .arg(3)
            .arg(self.key("seen", &hex))
            .arg(self.key("stream", &event.project))
            .arg(self.key("seq", &event.project))
            .arg(self.config.dedupe_ttl_ms)
            .arg(self.config.history_events)
            .arg(self.config.history_ttl_ms)
            .arg(json)
            .arg(&r.channel)
            .arg(epoch_base());
        let id: u64 = self.query(r, cmd).await?;
        Ok((id > 0).then_some(id))
    }

    /// The events of `project` after id `after` (at most `hooks.history_events`), oldest first.
    pub async fn after(&self, project: &str, after: u64) -> Result<Replay, HistoryError> {
        let Some(r) = &self.redis else {
            let Some(log) = self.logs.get(project) else {
                return Ok(Replay::default());
            };
            let log = lock(&log);
            return Ok(replay_from(log.events.iter().cloned(), after, log.last_id));
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(READ)
            .arg(2)
            .arg(self.key("stream", project))
            .arg(self.key("seq", project))
            .arg(after)
            .arg(self.config.history_events);
        let (last, entries): (u64, Vec<(String, Vec<String>)>) = self.query(r, cmd).await?;
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let id = id.strip_prefix("0-").and_then(|n| n.parse::<u64>().ok());
            let json = fields.get(1);
            let (Some(id), Some(json)) = (id, json) else {
                continue;
            };
            match serde_json::from_str::<HookEvent>(json) {
                Ok(e) => events.push(Stored {
                    id,
                    event: Arc::new(e),
                }),
                Err(e) => tracing::warn!(error = %e, project, "unreadable event in the history"),
            }
        }
        Ok(replay_from(events.into_iter(), after, last))
    }

    fn redis(&self) -> Result<&Redis, HistoryError> {
        self.redis
            .as_ref()
            .ok_or_else(|| HistoryError::Unavailable("broker.redis_url unusable".into()))
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        r: &Redis,
        cmd: redis::Cmd,
    ) -> Result<T, HistoryError> {
        let mut conn = r.connection().await?;
        let failed = match tokio::time::timeout(r.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".into(),
        };
        *lock(&r.conn) = None;
        Err(HistoryError::Unavailable(failed))
    }
}

impl Redis {
    /// A clone of the shared connection, connecting first when there is none (one connection attempt at a time).
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, HistoryError> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        let conn =
            tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
                .await
                .map_err(|_| HistoryError::Unavailable("connection timed out".into()))?
                .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        *lock(&self.conn) = Some(conn.clone());
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(project: &str, n: u64) -> HookEvent {
        HookEvent {
            project: project.into(),
            event_type: "push".into(),
            confidential: false,
            payload: serde_json::json!({ "n": n }),
        }
    }

    fn history(events: usize) -> History {
        let mut c = Config::default();
        c.hooks.history_events = events;
        History::new(&c)
    }

    #[tokio::test]
    async fn ids_per_project_duplicates_once_and_replay_with_gaps() {
        let h = history(3);
        let before = epoch_base();
        let mut delivered = Vec::new();
        for n in 1..=5u8 {
            h.append_local(event("1", n.into()), [n; 32], |s| delivered.push(s.id));
        }
        let b = delivered[0] - 1;
        assert!(b >= before, "ids start at the time's base");
        assert_eq!(delivered, [b + 1, b + 2, b + 3, b + 4, b + 5]);
        assert_eq!(
            h.append_local(event("1", 9), [2; 32], |_| {}),
            None,
            "a retry"
        );
        let other = h.append_local(event("2", 1), [7; 32], |_| {}).unwrap();
        assert!(other > before, "another project, its own sequence");
        let ids = |r: &Replay| r.events.iter().map(|s| s.id - b).collect::<Vec<_>>();
        let r = h.after("1", b + 3).await.unwrap();
        assert_eq!((ids(&r), r.gap), (vec![4, 5], false));
        let r = h.after("1", b + 1).await.unwrap();
        assert_eq!(
            (ids(&r), r.gap),
            (vec![3, 4, 5], true),
            "2 left the history"
        );
        let r = h.after("1", b + 5).await.unwrap();
        assert_eq!((ids(&r), r.gap), (vec![], false));
        let r = h.after("1", b + 99).await.unwrap();
        assert_eq!(
            (ids(&r), r.gap),
            (vec![3, 4, 5], true),
            "an id from a lost history"
        );
        let r = h.after("1", 17).await.unwrap();
        assert_eq!((ids(&r), r.gap), (vec![3, 4, 5], true), "an id from before");
        assert!(h.after("3", 0).await.unwrap().events.is_empty());
    }

    #[test]
    fn published_messages_parse() {
        let e = event("4", 1);
        let text = format!("H12 {}", serde_json::to_string(&e).unwrap());
        let s = parse_published(&text).unwrap().unwrap();
        assert_eq!((s.id, &*s.event), (12, &e));
        assert!(parse_published("{\"origin\":\"a\"}").is_none());
        assert!(parse_published("H1 {").unwrap().is_err());
    }
}
