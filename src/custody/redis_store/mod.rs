//! The logins of several instances, kept in Redis (`broker.kind = "redis"`): when an instance dies or drains, its
//! users' tabs reconnect to another one and are served without logging in again.
//!
//! - Each login is one record, `tabhub:login:<hash>`: the token set sealed with `custody.store_keys`
//!   ([`super::record`]), expiring with the refresh token. The key is a SHA-256 of the login id, never the cookie's
//!   value: reading Redis gives no cookie.
//! - A local copy of each login used here answers `get` without a round trip; a refresh starts from Redis's copy
//!   ([`TokenStore::reload`]) under a short per-login lock (`SET NX PX`, fenced by a random token, released by a
//!   compare-and-delete script), so two instances never spend the same refresh token.
//! - Removing a login (logout, back-channel logout, a refused refresh) deletes the record, leaves a tombstone (so
//!   an instance writing back after an outage does not bring it back) and announces the hash on
//!   `tabhub:logins:removed`: every instance drops its copy and closes that login's tabs.
//! - [`schema`]: the Redis keys, scripts and channel.
//! - Back-channel logout finds logins of other instances through index sets by user and by provider session
//!   (hashed too).
//! - Redis unreachable: each instance keeps serving its local copies (degraded); logins written or removed
//!   meanwhile are written back (or removed) when Redis answers again. Refreshes then run without the lock: two
//!   instances both cut off from Redis could spend one refresh token twice.
//!
//! Nothing here logs a token, a login id or its hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tabhub_commands::BoxFuture;
use tokio_util::sync::CancellationToken;

mod schema;

use super::record::Keys;
use super::store::{matches_logout, OnRemoved, RefreshTurn, Shared, StoredLogin, TokenStore};
use crate::backoff::Backoff;
use schema::{
    by_sid_key, by_sub_key, lock_key, record_key, sha, tombstone_key, Removed, PUT, REMOVE,
    REMOVED_CHANNEL, UNLOCK,
};

/// Local copies expire with their refresh token.
struct LocalExpiry;

impl moka::Expiry<String, (Arc<str>, StoredLogin)> for LocalExpiry {
    fn expire_after_create(
        &self,
        _: &String,
        v: &(Arc<str>, StoredLogin),
        now: Instant,
    ) -> Option<Duration> {
        Some(v.1.refresh_expires.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _: &String,
        v: &(Arc<str>, StoredLogin),
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.1.refresh_expires.saturating_duration_since(now))
    }
}

/// How the store reaches Redis and how long it waits.
pub struct RedisSettings {
    pub client: redis::Client,
    /// Timeout of one command (`broker.timeout_ms`).
    pub timeout: Duration,
    /// How long a refresh lock lives if its holder dies.
    pub lock_ttl: Duration,
    /// Tombstones outlive any refresh token whose lifetime is unknown here.
    pub default_refresh_lifetime: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
}

pub struct RedisStore {
    settings: RedisSettings,
    keys: Keys,
    conn: Mutex<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    /// Local copies by hash, with their login id (an announced removal names only the hash).
    local: moka::future::Cache<String, (Arc<str>, StoredLogin)>,
    /// Written here while Redis did not answer: hash -> login id, written back from the local copy.
    unsynced: Mutex<HashMap<String, Arc<str>>>,
    /// Removed here while Redis did not answer: hash -> tombstone TTL, removed there too when it answers.
    unremoved: Mutex<HashMap<String, Duration>>,
}

/// Why a Redis call gave nothing (unreachable, timed out, an error answer); never shown with details that could
/// carry data.
struct Down;

impl RedisStore {
    pub fn new(settings: RedisSettings, keys: Keys, max_logins: u64) -> RedisStore {
        RedisStore {
            settings,
            keys,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            local: moka::future::Cache::builder()
                .max_capacity(max_logins)
                .expire_after(LocalExpiry)
                .build(),
            unsynced: Mutex::new(HashMap::new()),
            unremoved: Mutex::new(HashMap::new()),
        }
    }

    fn unsynced(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<str>>> {
        self.unsynced.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn unremoved(&self) -> std::sync::MutexGuard<'_, HashMap<String, Duration>> {
        self.unremoved.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connection(&self) -> Result<MultiplexedConnection, Down> {
        let current = || self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = current() {
            return Ok(c);
        }
        let conn = tokio::time::timeout(
            self.settings.timeout,
            self.settings.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| Down)?
        .map_err(|_| Down)?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one command; a failure drops the connection (the next call reconnects).
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Down> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(self.settings.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                // The error's kind only: its text may quote arguments.
                tracing::warn!(kind = ?e.kind(), "Redis command for logins failed");
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(Down)
            }
            Err(_) => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(Down)
            }
        }
    }

    fn ttl_ms(login: &StoredLogin) -> u64 {
        (login
            .refresh_expires
            .saturating_duration_since(Instant::now())
            .as_millis() as u64)
            .max(1)
    }

    /// Writes a login's record (not over its tombstone). `Ok(false)`: it was removed meanwhile.
    async fn write(&self, hash: &str, login: &StoredLogin) -> Result<bool, Down> {
        self.write_with(hash, login, false).await
    }

    /// [`RedisStore::write`], or with `only_if_absent` leaving a record already there (perhaps newer) alone.
    async fn write_with(
        &self,
        hash: &str,
        login: &StoredLogin,
        only_if_absent: bool,
    ) -> Result<bool, Down> {
        let Some(sealed) = self.keys.seal(&record_key(hash), login) else {
            return Err(Down);
        };
        let mut cmd = redis::cmd("EVAL");
        let mut keys = vec![
            record_key(hash),
            tombstone_key(hash),
            by_sub_key(&login.user.id),
        ];
        if let Some(sid) = &login.kc_sid {
            keys.push(by_sid_key(sid));
        }
        cmd.arg(PUT).arg(keys.len()).arg(&keys);
        cmd.arg(sealed)
            .arg(Self::ttl_ms(login))
            .arg(hash)
            .arg(if only_if_absent { "1" } else { "0" });
        self.run::<i64>(&cmd).await.map(|written| written == 1)
    }

    /// Deletes a record, leaves its tombstone, announces the removal; returns the record as it was.
    async fn delete(
        &self,
        hash: &str,
        tombstone_ttl: Duration,
    ) -> Result<Option<StoredLogin>, Down> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(REMOVE)
            .arg(2)
            .arg(record_key(hash))
            .arg(tombstone_key(hash))
            .arg(tombstone_ttl.as_millis().max(1) as u64);
        let old: Option<Vec<u8>> = self.run(&cmd).await?;
        let announcement = serde_json::to_string(&Removed {
            login: hash.to_owned(),
        })
        .map_err(|_| Down)?;
        self.run::<i64>(redis::cmd("PUBLISH").arg(REMOVED_CHANNEL).arg(announcement))
            .await?;
        Ok(old.and_then(|v| self.keys.open(&record_key(hash), &v)))
    }

    /// How long a removed login's tombstone must last: as long as any copy could be written back.
    fn tombstone_ttl(&self, login: Option<&StoredLogin>) -> Duration {
        let own = login
            .map(|l| l.refresh_expires.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        own.max(self.settings.default_refresh_lifetime)
    }

    async fn remove_hash(&self, hash: &str) -> Option<StoredLogin> {
        let local = self.local.remove(hash).await.map(|(_, s)| s);
        self.unsynced().remove(hash);
        let ttl = self.tombstone_ttl(local.as_ref());
        match self.delete(hash, ttl).await {
            Ok(shared) => local.or(shared),
            Err(Down) => {
                self.unremoved().insert(hash.to_owned(), ttl);
                local
            }
        }
    }

    /// A login found removed in Redis (its tombstone) while this instance still had it: drop it and close its
    /// tabs here (the announcement was missed, or came before our write-back).
    async fn found_removed(&self, hash: &str, on_removed: &OnRemoved) {
        self.unsynced().remove(hash);
        if let Some((login_id, s)) = self.local.remove(hash).await {
            on_removed(&s.user.id, &login_id);
        }
    }

    /// Writes back what an outage kept local: removals first, then logins made or refreshed meanwhile.
    async fn reconcile(&self, on_removed: &OnRemoved) {
        let removals: Vec<(String, Duration)> = self.unremoved().drain().collect();
        for (hash, ttl) in removals {
            if self.delete(&hash, ttl).await.is_err() {
                self.unremoved().insert(hash, ttl);
            }
        }
        let writes: Vec<(String, Arc<str>)> = self.unsynced().drain().collect();
        let count = writes.len();
        for (hash, login_id) in writes {
            let Some((_, login)) = self.local.get(&hash).await else {
                continue;
            };
            match self.write(&hash, &login).await {
                Ok(true) => {}
                // Removed elsewhere meanwhile: so here too.
                Ok(false) => self.found_removed(&hash, on_removed).await,
                Err(Down) => {
                    self.unsynced().insert(hash, login_id);
                }
            }
        }
        if count > 0 && self.unsynced().is_empty() {
            tracing::info!(
                logins = count,
                "logins kept locally during a Redis outage written back"
            );
        }
    }

    /// After an outage Redis may have lost its data (a restart without persistence): every login used here goes
    /// back where it is missing (never over a newer copy, never over a tombstone). A tombstone found means a
    /// logout this instance did not hear: its tabs close here now.
    async fn write_back_all(&self, on_removed: &OnRemoved) {
        let all: Vec<(String, StoredLogin)> = self
            .local
            .iter()
            .map(|(h, (_, s))| ((*h).clone(), s))
            .collect();
        for (hash, login) in all {
            match self.write_with(&hash, &login, true).await {
                Ok(true) => {}
                // Logged out elsewhere while we could not hear it.
                Ok(false) => self.found_removed(&hash, on_removed).await,
                Err(Down) => return,
            }
        }
    }

    /// Another instance removed a login: drop the local copy and close its tabs here.
    async fn removed_elsewhere(&self, payload: &str, on_removed: &OnRemoved) {
        let Ok(r) = serde_json::from_str::<Removed>(payload) else {
            tracing::warn!("unreadable message on the logins channel");
            return;
        };
        if let Some((login_id, s)) = self.local.remove(&r.login).await {
            self.unsynced().remove(&r.login);
            on_removed(&s.user.id, &login_id);
        }
    }

    /// Listens for removals and writes back after outages, until `stop`.
    async fn watch(self: Arc<Self>, on_removed: OnRemoved) {
        let mut backoff =
            Backoff::new(self.settings.reconnect_initial, self.settings.reconnect_max);
        let mut tick =
            tokio::time::interval(self.settings.reconnect_max.min(Duration::from_secs(1)));
        let mut first = true;
        loop {
            if let Ok(mut pubsub) = self.settings.client.get_async_pubsub().await {
                if pubsub.subscribe(REMOVED_CHANNEL).await.is_ok() {
                    backoff.reset();
                    // Removals announced while unsubscribed are missed: the refresh lock's reload still sees them.
                    self.reconcile(&on_removed).await;
                    if !first {
                        self.write_back_all(&on_removed).await;
                    }
                    first = false;
                    let mut stream = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            msg = stream.next() => match msg {
                                Some(msg) => {
                                    if let Ok(payload) = msg.get_payload::<String>() {
                                        self.removed_elsewhere(&payload, &on_removed).await;
                                    }
                                }
                                None => break,
                            },
                            _ = tick.tick() => {
                                if !self.unsynced().is_empty() || !self.unremoved().is_empty() {
                                    self.reconcile(&on_removed).await;
                                }
                            }
                        }
                    }
                    tracing::warn!("Redis subscription for logins ended; reconnecting");
                }
            }
            tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(50))).await;
        }
    }

    /// Reads Redis's copy; a found one replaces the local copy.
    async fn read(&self, login_id: &str, hash: &str) -> Result<Option<StoredLogin>, Down> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(record_key(hash)).arg(tombstone_key(hash));
        let (record, tombstone): (Option<Vec<u8>>, Option<String>) = self.run(&cmd).await?;
        match record {
            Some(v) => match self.keys.open(&record_key(hash), &v) {
                Some(s) => {
                    self.local
                        .insert(hash.to_owned(), (Arc::from(login_id), s.clone()))
                        .await;
                    Ok(Some(s))
                }
                None => {
                    tracing::warn!("a stored login opens with none of custody.store_keys");
                    Ok(None)
                }
            },
            None if tombstone.is_some() => {
                self.local.invalidate(hash).await;
                Ok(None)
            }
            // Not removed, yet not in Redis (it lost its data, or missed our write): the local copy, written back.
            None => match self.local.get(hash).await {
                Some((_, s)) => {
                    if let Err(Down) = self.write(hash, &s).await {
                        self.unsynced().insert(hash.to_owned(), Arc::from(login_id));
                    }
                    Ok(Some(s))
                }
                None => Ok(None),
            },
        }
    }
}

/// On the `Arc`: [`TokenStore::start`] hands the store to its background task.
impl TokenStore for Arc<RedisStore> {
    fn get<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Option<StoredLogin>> {
        Box::pin(async move {
            let hash = sha(login_id);
            if let Some((_, s)) = self.local.get(&hash).await {
                return Some(s);
            }
            self.read(login_id, &hash).await.ok().flatten()
        })
    }

    fn put<'a>(&'a self, login_id: &'a str, login: StoredLogin) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let hash = sha(login_id);
            self.local
                .insert(hash.clone(), (Arc::from(login_id), login.clone()))
                .await;
            match self.write(&hash, &login).await {
                Ok(true) => {}
                Ok(false) => self.local.invalidate(&hash).await,
                Err(Down) => {
                    tracing::warn!("Redis unreachable: a login is kept locally until it returns");
                    self.unsynced().insert(hash, Arc::from(login_id));
                }
            }
        })
    }

    fn remove<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Option<StoredLogin>> {
        Box::pin(async move { self.remove_hash(&sha(login_id)).await })
    }

    fn remove_matching<'a>(
        &'a self,
        kc_sid: Option<&'a str>,
        sub: Option<&'a str>,
    ) -> BoxFuture<'a, Vec<(Option<String>, StoredLogin)>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let local: Vec<(String, Arc<str>)> = self
                .local
                .iter()
                .filter(|(_, (_, s))| matches_logout(s, kc_sid, sub))
                .map(|(h, (id, _))| ((*h).clone(), id))
                .collect();
            for (hash, login_id) in local {
                if let Some(s) = self.remove_hash(&hash).await {
                    out.push((Some(login_id.to_string()), s));
                }
            }
            // Logins of other instances, through the index sets.
            let mut cmd = redis::cmd("SUNION");
            for key in kc_sid
                .map(by_sid_key)
                .into_iter()
                .chain(sub.map(by_sub_key))
            {
                cmd.arg(key);
            }
            let Ok(hashes) = self.run::<Vec<String>>(&cmd).await else {
                tracing::warn!("Redis unreachable: back-channel logout matched local logins only");
                return out;
            };
            for hash in hashes {
                let Ok(Some(v)) = self
                    .run::<Option<Vec<u8>>>(redis::cmd("GET").arg(record_key(&hash)))
                    .await
                else {
                    continue;
                };
                let Some(s) = self.keys.open(&record_key(&hash), &v) else {
                    continue;
                };
                if matches_logout(&s, kc_sid, sub) {
                    self.remove_hash(&hash).await;
                    out.push((None, s));
                }
            }
            out
        })
    }

    fn reload<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Shared> {
        Box::pin(async move {
            match self.read(login_id, &sha(login_id)).await {
                Ok(Some(s)) => Shared::Found(s),
                Ok(None) => Shared::Gone,
                Err(Down) => Shared::Unreachable,
            }
        })
    }

    fn lock_refresh<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, RefreshTurn> {
        Box::pin(async move {
            let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
            let mut cmd = redis::cmd("SET");
            cmd.arg(lock_key(&sha(login_id)))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.settings.lock_ttl.as_millis() as u64);
            match self.run::<Option<String>>(&cmd).await {
                Ok(Some(_)) => RefreshTurn::Ours(token),
                Ok(None) => RefreshTurn::Theirs,
                Err(Down) => RefreshTurn::Alone,
            }
        })
    }

    fn unlock_refresh<'a>(&'a self, login_id: &'a str, turn: RefreshTurn) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let RefreshTurn::Ours(token) = turn {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(UNLOCK)
                    .arg(1)
                    .arg(lock_key(&sha(login_id)))
                    .arg(token);
                // Unreachable: the lock expires on its own.
                let _ = self.run::<i64>(&cmd).await;
            }
        })
    }

    fn start(&self, stop: CancellationToken, on_removed: OnRemoved) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = me.watch(on_removed) => {}
            }
        });
    }
}
