//! The session's token: the newest one any tab offered, and the watch over its expiry.
//!
//! What to do next is a pure function of the clock and the token ([`next_step`]), so it is tested without time;
//! [`watch_expiry`] is a thin async shell that sleeps until the step's moment or until the token changes, and asks
//! its [`TokenHolder`] (the session) to warn, refresh or end.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::Verified;
use crate::backoff::Backoff;
use crate::clock::now_unix;

/// The newest token of a session. A watch channel, so that the expiry watcher and the upstream streams can wait
/// for a change without holding the session.
pub(crate) struct TokenCell(watch::Sender<Option<Verified>>);

impl Default for TokenCell {
    fn default() -> Self {
        TokenCell(watch::Sender::new(None))
    }
}

impl TokenCell {
    /// Makes `token` current if it expires later than the current one (a tab may offer an older token).
    pub(crate) fn offer(&self, token: &Verified) {
        self.0.send_if_modified(|cur| {
            let newer = cur.as_ref().is_none_or(|c| token.exp > c.exp);
            if newer {
                *cur = Some(token.clone());
            }
            newer
        });
    }

    /// Makes a token just refreshed through token custody current unless the current one expires later: a refresh
    /// within the second of the previous token has the same `exp`, and must still replace it (the previous one may
    /// be signed by a withdrawn key).
    pub(crate) fn renew(&self, token: &Verified) {
        self.0.send_if_modified(|cur| {
            let renew = cur.as_ref().is_none_or(|c| token.exp >= c.exp);
            if renew {
                *cur = Some(token.clone());
            }
            renew
        });
    }

    pub(crate) fn changes(&self) -> watch::Receiver<Option<Verified>> {
        self.0.subscribe()
    }

    /// The newest token, if it has not expired.
    pub(crate) fn valid(&self) -> Option<Verified> {
        self.0
            .borrow()
            .as_ref()
            .filter(|t| t.exp > now_unix())
            .cloned()
    }
}

/// What the expiry watcher does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Sleep until this moment (Unix seconds), or until the token changes.
    WaitUntil(u64),
    /// Refresh through token custody now.
    Refresh,
    /// Tell the tabs the token expires in this many seconds (once per token).
    Warn { expires_in: u64 },
    /// The token expired without a fresher one.
    Expire,
}

/// What the watcher knows at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    pub now: u64,
    pub exp: u64,
    /// Seconds before `exp` at which tabs are warned (`auth.expiry_warning_ms`).
    pub warn_margin: u64,
    /// Seconds before `exp` at which to refresh silently, when the session can refresh (token custody, with
    /// tabs that came through a login); `None` otherwise.
    pub refresh_tolerance: Option<u64>,
    /// The `exp` already warned about.
    pub warned_for: Option<u64>,
}

/// The next step for a token. A session that can refresh does so before the expiry instead of warning its tabs.
pub(crate) fn next_step(f: Facts) -> Step {
    if f.now >= f.exp {
        return Step::Expire;
    }
    if let Some(tolerance) = f.refresh_tolerance {
        let at = f.exp.saturating_sub(tolerance);
        return if f.now < at {
            Step::WaitUntil(at)
        } else {
            Step::Refresh
        };
    }
    let warn_at = f.exp.saturating_sub(f.warn_margin);
    if f.now < warn_at {
        return Step::WaitUntil(warn_at);
    }
    if f.warned_for != Some(f.exp) {
        return Step::Warn {
            expires_in: f.exp - f.now,
        };
    }
    Step::WaitUntil(f.exp)
}

/// What the watcher asks of the session.
pub(crate) trait TokenHolder: Send + Sync + 'static {
    /// Seconds before `exp` at which `current` can be refreshed silently, if it can be.
    fn refresh_tolerance(&self, current: &Verified) -> Option<u64>;
    /// Seconds before `exp` at which the tabs are warned.
    fn warn_margin(&self) -> u64;
    /// Tells every tab the token expires soon (`authExpiring`).
    fn warn(&self, expires_in: u64);
    /// Refreshes through token custody; true when a fresh token was installed, false when the identity provider
    /// could not be reached.
    fn refresh(self: Arc<Self>, current: Verified) -> impl Future<Output = bool> + Send;
    /// The token expired without renewal: tell and close the tabs.
    fn expire(self: Arc<Self>, current: Verified) -> impl Future<Output = ()> + Send;
}

/// Watches the session's token until the session is gone. Holds only a weak reference while sleeping, so it
/// never keeps a session alive.
pub(crate) async fn watch_expiry<H: TokenHolder>(
    holder: Weak<H>,
    mut token: watch::Receiver<Option<Verified>>,
) {
    let mut warned_for = None;
    // An unreachable identity provider is retried with backoff until the token really expires.
    let mut refresh_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        let current = token.borrow_and_update().clone();
        let Some(current) = current else {
            if token.changed().await.is_err() {
                return;
            }
            continue;
        };
        let Some(h) = holder.upgrade() else { return };
        let now = now_unix();
        let step = next_step(Facts {
            now,
            exp: current.exp,
            warn_margin: h.warn_margin(),
            refresh_tolerance: h.refresh_tolerance(&current),
            warned_for,
        });
        let wait = match step {
            Step::WaitUntil(at) => Duration::from_secs(at - now),
            Step::Warn { expires_in } => {
                warned_for = Some(current.exp);
                h.warn(expires_in);
                continue;
            }
            Step::Refresh => {
                // Boxed, like `expire` below: an HTTP refresh's state inline made every session's watcher task
                // 16 KiB, most of a user's memory, for a call that happens once per token lifetime.
                if Box::pin(h.clone().refresh(current.clone())).await {
                    refresh_backoff.reset();
                    continue;
                }
                let left = Duration::from_secs(current.exp.saturating_sub(now_unix()));
                refresh_backoff
                    .next_delay()
                    .max(Duration::from_millis(100))
                    .min(left)
            }
            Step::Expire => {
                Box::pin(h.expire(current)).await;
                if token.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        drop(h);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = token.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(now: u64, exp: u64) -> Facts {
        Facts {
            now,
            exp,
            warn_margin: 60,
            refresh_tolerance: None,
            warned_for: None,
        }
    }

    #[test]
    fn warns_once_before_the_expiry_then_expires() {
        assert_eq!(next_step(facts(1_000, 1_300)), Step::WaitUntil(1_240));
        assert_eq!(
            next_step(facts(1_240, 1_300)),
            Step::Warn { expires_in: 60 }
        );
        let warned = Facts {
            warned_for: Some(1_300),
            ..facts(1_250, 1_300)
        };
        assert_eq!(next_step(warned), Step::WaitUntil(1_300));
        assert_eq!(next_step(facts(1_300, 1_300)), Step::Expire);
        // A new token (another exp) is warned about again.
        let renewed = Facts {
            warned_for: Some(1_300),
            ..facts(1_590, 1_600)
        };
        assert_eq!(next_step(renewed), Step::Warn { expires_in: 10 });
    }

    #[test]
    fn a_session_that_can_refresh_refreshes_instead_of_warning() {
        let f = |now| Facts {
            refresh_tolerance: Some(30),
            ..facts(now, 1_300)
        };
        assert_eq!(next_step(f(1_000)), Step::WaitUntil(1_270));
        assert_eq!(next_step(f(1_270)), Step::Refresh);
        assert_eq!(next_step(f(1_299)), Step::Refresh);
        assert_eq!(next_step(f(1_300)), Step::Expire);
    }

    #[test]
    fn a_margin_longer_than_the_token_warns_at_once() {
        assert_eq!(
            next_step(facts(1_000, 1_030)),
            Step::Warn { expires_in: 30 }
        );
    }
}
