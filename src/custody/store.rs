//! Where the server keeps logins' tokens: the [`TokenStore`] trait, and [`MemoryStore`] (moka, each entry expiring
//! with its refresh token), the store of a single process (`broker.kind = "memory"`). The shared store of several
//! instances is [`super::redis_store`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tabhub_commands::{BoxFuture, User};

/// One login's tokens (what a login cookie stands for). Never logged; `Debug` hides the secrets.
#[derive(Clone)]
pub struct StoredLogin {
    pub user: User,
    /// The provider's session id (`sid`, Keycloak's session), for back-channel logout: from the login's ID token,
    /// else its access token. Never logged.
    pub kc_sid: Option<String>,
    pub access_token: Arc<str>,
    /// Access-token expiry, seconds since the Unix epoch.
    pub access_exp: u64,
    pub refresh_token: Arc<str>,
    /// When the refresh token stops working (and the entry is dropped).
    pub refresh_expires: Instant,
    /// For the end-session endpoint's `id_token_hint`.
    pub id_token: Option<Arc<str>>,
}

impl std::fmt::Debug for StoredLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredLogin")
            .field("user", &self.user.id)
            .field("access_exp", &self.access_exp)
            .finish_non_exhaustive()
    }
}

/// Whose turn it is to refresh a login (spend its refresh token): with several instances sharing logins, only one
/// may, or the provider sees a rotated-out refresh token and may end the whole session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshTurn {
    /// No other instance can refresh it: one process, or a shared store that cannot be reached (degraded).
    Alone,
    /// This instance holds the login's refresh lock, fenced by this random token (released with it only).
    Ours(String),
    /// Another instance holds the lock: wait for its result instead.
    Theirs,
}

/// A login as the shared store has it, past any local cache.
pub enum Shared {
    Found(StoredLogin),
    /// Not there: logged out (or expired) everywhere.
    Gone,
    /// The shared store cannot be reached: only the local copy is known.
    Unreachable,
}

/// Called with `(user id, login id)` when a login was removed on another instance: its tabs here must close.
pub type OnRemoved = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Storage of logins by login id (the cookie's value).
pub trait TokenStore: Send + Sync {
    fn get<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Option<StoredLogin>>;
    fn put<'a>(&'a self, login_id: &'a str, login: StoredLogin) -> BoxFuture<'a, ()>;
    /// Removes the login everywhere; returns it as it was, if known.
    fn remove<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Option<StoredLogin>>;
    /// Removes the logins whose Keycloak session id or user matches ([`matches_logout`], back-channel logout)
    /// everywhere; returns them, with their login id when known here (the caller closes their tabs here; the
    /// instances that know the others close theirs).
    fn remove_matching<'a>(
        &'a self,
        kc_sid: Option<&'a str>,
        sub: Option<&'a str>,
    ) -> BoxFuture<'a, Vec<(Option<String>, StoredLogin)>>;
    /// The login as the shared store has it now (another instance may have refreshed it): a refresh starts from
    /// there, never from a refresh token that may have been rotated out.
    fn reload<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Shared>;
    /// Takes the login's refresh lock if no one holds it.
    fn lock_refresh<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, RefreshTurn>;
    /// Releases a lock [`TokenStore::lock_refresh`] gave (nothing if another holder took it over since).
    fn unlock_refresh<'a>(&'a self, login_id: &'a str, turn: RefreshTurn) -> BoxFuture<'a, ()>;
    /// Starts background work until `stop` (a shared store: hearing other instances' logouts, writing back what an
    /// outage kept local).
    fn start(&self, _stop: tokio_util::sync::CancellationToken, _on_removed: OnRemoved) {}
}

/// Back-channel logout: with a session id, the logins made in that provider session (of that user, if `sub` is
/// given too); with only `sub`, every login of the user. A login that kept no session id (its provider put none in
/// its tokens) is matched by `sub` alone: logging out too many of one user's logins beats leaving one open.
pub fn matches_logout(s: &StoredLogin, kc_sid: Option<&str>, sub: Option<&str>) -> bool {
    let same_user = |u: &str| s.user.id == u;
    match (kc_sid, sub, s.kc_sid.as_deref()) {
        (Some(k), sub, Some(own)) => own == k && sub.is_none_or(same_user),
        (Some(_), sub, None) => sub.is_some_and(same_user),
        (None, Some(u), _) => same_user(u),
        (None, None, _) => false,
    }
}

/// Entries expire at their refresh token's expiry.
pub(super) struct RefreshExpiry;

impl moka::Expiry<String, StoredLogin> for RefreshExpiry {
    fn expire_after_create(&self, _: &String, v: &StoredLogin, now: Instant) -> Option<Duration> {
        Some(v.refresh_expires.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _: &String,
        v: &StoredLogin,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.refresh_expires.saturating_duration_since(now))
    }
}

/// The in-memory store.
pub struct MemoryStore {
    cache: moka::future::Cache<String, StoredLogin>,
}

impl MemoryStore {
    pub fn new(max_logins: u64) -> Self {
        MemoryStore {
            cache: moka::future::Cache::builder()
                .max_capacity(max_logins)
                .expire_after(RefreshExpiry)
                .build(),
        }
    }
}

impl TokenStore for MemoryStore {
    fn get<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Option<StoredLogin>> {
        Box::pin(self.cache.get(login_id))
    }
    fn put<'a>(&'a self, login_id: &'a str, login: StoredLogin) -> BoxFuture<'a, ()> {
        Box::pin(self.cache.insert(login_id.to_owned(), login))
    }
    fn remove<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Option<StoredLogin>> {
        Box::pin(self.cache.remove(login_id))
    }
    fn remove_matching<'a>(
        &'a self,
        kc_sid: Option<&'a str>,
        sub: Option<&'a str>,
    ) -> BoxFuture<'a, Vec<(Option<String>, StoredLogin)>> {
        Box::pin(async move {
            let ids: Vec<String> = self
                .cache
                .iter()
                .filter(|(_, s)| matches_logout(s, kc_sid, sub))
                .map(|(k, _)| (*k).clone())
                .collect();
            let mut out = Vec::new();
            for id in ids {
                if let Some(s) = self.cache.remove(&id).await {
                    out.push((Some(id), s));
                }
            }
            out
        })
    }
    fn reload<'a>(&'a self, login_id: &'a str) -> BoxFuture<'a, Shared> {
        Box::pin(async move {
            match self.cache.get(login_id).await {
                Some(s) => Shared::Found(s),
                None => Shared::Gone,
            }
        })
    }
    /// One process: its refreshes of one login already share one request (`Custody::refresh`).
    fn lock_refresh<'a>(&'a self, _: &'a str) -> BoxFuture<'a, RefreshTurn> {
        Box::pin(async { RefreshTurn::Alone })
    }
    fn unlock_refresh<'a>(&'a self, _: &'a str, _: RefreshTurn) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(user: &str, sid: Option<&str>) -> StoredLogin {
        StoredLogin {
            user: User {
                id: user.into(),
                name: user.into(),
            },
            kc_sid: sid.map(str::to_owned),
            access_token: Arc::from("a"),
            access_exp: 0,
            refresh_token: Arc::from("r"),
            refresh_expires: Instant::now(),
            id_token: None,
        }
    }

    #[test]
    fn logout_matches_by_session_then_by_user() {
        let with_sid = login("u1", Some("s1"));
        assert!(matches_logout(&with_sid, Some("s1"), Some("u1")));
        assert!(matches_logout(&with_sid, Some("s1"), None));
        assert!(
            !matches_logout(&with_sid, Some("s2"), Some("u1")),
            "another session of the user"
        );
        assert!(!matches_logout(&with_sid, Some("s1"), Some("u2")));
        assert!(matches_logout(&with_sid, None, Some("u1")));
        assert!(!matches_logout(&with_sid, None, None));
        let without_sid = login("u1", None);
        assert!(
            matches_logout(&without_sid, Some("s1"), Some("u1")),
            "by sub when no sid was kept"
        );
        assert!(!matches_logout(&without_sid, Some("s1"), None));
        assert!(!matches_logout(&without_sid, Some("s1"), Some("u2")));
    }
}
