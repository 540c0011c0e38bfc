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
//! Publish channels with the Redis broker keep their history the same way, keyed by channel under
//! `publish.redis_prefix`: one script ([`APPEND_CHANNELS`]) gives each channel message of a batch its channel's next
//! id (the same rule, [`epoch_base`] included), appends it to the channel's stream and publishes the batch; a resume
//! reads the stream ([`History::channel_after`]). With the memory broker channels keep their in-process buffers
//! ([`crate::channels`]).
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

/// What a replay found after an id: webhook events, or a channel's (id, message JSON).
#[derive(Debug)]
pub struct Replay<T = Stored> {
    pub events: Vec<T>,
    /// Some events after the id are gone (older than the history, or an id from before the history was lost).
    pub gap: bool,
}

impl<T> Default for Replay<T> {
    fn default() -> Self {
        Replay {
            events: Vec::new(),
            gap: false,
        }
    }
}

/// A publish channel's message as the history keeps it: its id and the message's JSON.
pub type ChannelEntry = (u64, String);

#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("the event history (Redis) is unavailable: {0}")]
    Unavailable(String),
}

/// The Lua function both append scripts use to take a topic's next id: a counter starting at `base`, and a
/// counter lost while its stream lived on (eviction) resumes after the stream's last id.
macro_rules! next_id_lua {
    () => {
        r"
local function next_id(stream, seq, base)
  if redis.call('EXISTS', seq) == 0 then redis.call('SET', seq, base) end
  local n = redis.call('INCR', seq)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 then
    local l = tonumber(string.match(last[1][1], '%-(%d+)$'))
    if l and n <= l then n = l + 1; redis.call('SET', seq, string.format('%.0f', n)) end
  end
  -- Lua numbers are doubles: written with %.0f, never as 1.7e+15.
  return string.format('%.0f', n)
end
"
    };
}

/// The Redis side of [`History`]: appends and publishes an event once per delivery key. Returns the id, or 0 for a
/// delivery seen before. The delivery key is set last: a script is atomic for other clients but a failed command
/// does not undo the earlier ones, so a delivery that failed half-way is not taken for a duplicate when GitLab
/// retries it.
pub const APPEND: &str = concat!(
    next_id_lua!(),
    r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local id = next_id(KEYS[2], KEYS[3], ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '0-' .. id, 'e', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[5], 'H' .. id .. ' ' .. ARGV[4])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return tonumber(id)
"
);

/// The Redis side of a published batch with channel messages: each channel message takes its channel's next id and
/// joins the channel's stream, then the whole batch is published on the broker channel as `P<ids> <batch JSON>`
/// (the ids of its channel messages in order, comma-separated), all atomically: every instance receives a channel's
/// messages in id order, and a publish answered 200 is in the history. KEYS: stream and counter of each channel
/// message; ARGV: length kept, expiry, id base, broker channel, batch, then each channel message. Returns the ids.
pub const APPEND_CHANNELS: &str = concat!(
    next_id_lua!(),
    r"
local ids = {}
for i = 1, #KEYS / 2 do
  local stream, seq = KEYS[2 * i - 1], KEYS[2 * i]
  local id = next_id(stream, seq, ARGV[3])
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '0-' .. id, 'e', ARGV[5 + i])
  redis.call('PEXPIRE', stream, ARGV[2])
  redis.call('PEXPIRE', seq, ARGV[2])
  ids[i] = id
end
redis.call('PUBLISH', ARGV[4], 'P' .. table.concat(ids, ',') .. ' ' .. ARGV[5])
return ids
"
);

/// Reads a topic's last id and the newest events after an id, at most `ARGV[2]`, oldest first: the newest, since a
/// stream trimmed with `MAXLEN ~` keeps more than that, and a replay of the oldest would leave a hole between it and
/// the live events, where the newest tell a hole by their first id (`gap`). An id beyond the last one comes from a
/// history since lost: everything kept is read (see `replay_from`).
const READ: &str = r"
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local after = ARGV[1]
if tonumber(after) > seq then after = '0' end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '(0-' .. after, 'COUNT', ARGV[2])
local entries = {}
for i = #newest, 1, -1 do entries[#entries + 1] = newest[i] end
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

/// Where the channels' histories are kept (`[publish]`).
struct ChannelKeys {
    prefix: String,
    events: usize,
    ttl_ms: u64,
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
    channels: ChannelKeys,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn replay_from<T>(
    events: impl Iterator<Item = T>,
    id: impl Fn(&T) -> u64,
    after: u64,
    last: u64,
) -> Replay<T> {
    // An id beyond the last one comes from a history since lost: everything kept is new to the tab.
    let (after, lost) = if after > last {
        (0, true)
    } else {
        (after, false)
    };
    let events: Vec<T> = events.filter(|s| id(s) > after).collect();
    let first_missing = match events.first() {
        Some(s) => id(s) > after + 1,
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
            channels: ChannelKeys {
                prefix: config.publish.redis_prefix.clone(),
                events: config.publish.buffer_events,
                ttl_ms: config.publish.history_ttl_ms,
            },
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
            return Ok(replay_from(
                log.events.iter().cloned(),
                |s| s.id,
                after,
                log.last_id,
            ));
        };
        let stream = self.key("stream", project);
        let seq = self.key("seq", project);
        let (last, entries) = self
            .read(r, &stream, &seq, after, self.config.history_events)
            .await?;
        let mut events = Vec::with_capacity(entries.len());
        for (id, json) in entries {
            match serde_json::from_str::<HookEvent>(&json) {
                Ok(e) => events.push(Stored {
                    id,
                    event: Arc::new(e),
                }),
                Err(e) => tracing::warn!(error = %e, project, "unreadable event in the history"),
            }
        }
        Ok(replay_from(events.into_iter(), |s| s.id, after, last))
    }

    /// A stream's last id (its counter) and its entries after `after`, at most `count`.
    async fn read(
        &self,
        r: &Redis,
        stream: &str,
        seq: &str,
        after: u64,
        count: usize,
    ) -> Result<(u64, Vec<ChannelEntry>), HistoryError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(READ)
            .arg(2)
            .arg(stream)
            .arg(seq)
            .arg(after)
            .arg(count);
        let (last, entries): (u64, Vec<(String, Vec<String>)>) = self.query(r, cmd).await?;
        let entries = entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let id = id.strip_prefix("0-")?.parse::<u64>().ok()?;
                Some((id, fields.into_iter().nth(1)?))
            })
            .collect();
        Ok((last, entries))
    }

    fn channel_key(&self, what: &str, channel: &str) -> String {
        format!("{}{what}:{channel}", self.channels.prefix)
    }

    /// Redis: gives each channel message of a batch its channel's next id, keeps it in the channel's stream and
    /// publishes the batch to every instance (see [`APPEND_CHANNELS`]). `channel_messages` are the batch's channel
    /// messages in order, (channel, message JSON); `batch` is what the broker channel carries. Returns their ids.
    pub async fn append_channels(
        &self,
        channel_messages: &[(String, String)],
        batch: &str,
        broker_channel: &str,
    ) -> Result<Vec<u64>, HistoryError> {
        let r = self.redis()?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPEND_CHANNELS).arg(channel_messages.len() * 2);
        for (channel, _) in channel_messages {
            cmd.arg(self.channel_key("stream", channel))
                .arg(self.channel_key("seq", channel));
        }
        cmd.arg(self.channels.events)
            .arg(self.channels.ttl_ms)
            .arg(epoch_base())
            .arg(broker_channel)
            .arg(batch);
        for (_, json) in channel_messages {
            cmd.arg(json);
        }
        let ids: Vec<String> = self.query(r, cmd).await?;
        ids.iter()
            .map(|id| {
                id.parse()
                    .map_err(|_| HistoryError::Unavailable(format!("bad id from Redis: {id}")))
            })
            .collect()
    }

    /// Redis: the messages of publish channel `channel` after id `after` (at most `publish.buffer_events`), oldest
    /// first, as (id, message JSON).
    pub async fn channel_after(
        &self,
        channel: &str,
        after: u64,
    ) -> Result<Replay<ChannelEntry>, HistoryError> {
        let r = self.redis()?;
        let stream = self.channel_key("stream", channel);
        let seq = self.channel_key("seq", channel);
        let (last, entries) = self
            .read(r, &stream, &seq, after, self.channels.events)
            .await?;
        Ok(replay_from(entries.into_iter(), |e| e.0, after, last))
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
