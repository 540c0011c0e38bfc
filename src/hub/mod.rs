//! The hub: `sub` -> the user's session.
//!
//! The first tab of a user creates the session, later tabs join it. When the last tab leaves, the session lingers
//! (`session.linger_ms`) so that a page reload does not restart its loops; then the hub stops it. Creating and
//! stopping both happen under the hub's lock, and a session stops only if no tab joined since it became empty
//! (its generation did not move), so closing and reopening a tab any number of times leaves exactly one session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::Verified;
use crate::close_codes::CloseCode;
use crate::services::Services;
use crate::session::{AttachError, Session};
use crate::tab::Tab;

pub struct Hub {
    services: Arc<Services>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Hub {
    pub fn new(services: Arc<Services>) -> Arc<Hub> {
        Arc::new(Hub {
            services,
            sessions: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches `tab` to its user's session, creating the session if needed. `greeting` is queued to the tab
    /// first, before the loops' snapshots, and only when it joins.
    pub fn join(
        &self,
        token: &Verified,
        tab: &Arc<Tab>,
        greeting: Utf8Bytes,
    ) -> Result<Arc<Session>, AttachError> {
        let mut map = self.lock();
        loop {
            let session = map
                .entry(token.user.id.clone())
                .or_insert_with(|| {
                    Session::new(self.services.clone(), token.user.clone(), token.anonymous)
                })
                .clone();
            match session.attach(tab, token, &greeting) {
                Ok(()) => return Ok(session),
                Err(AttachError::Stopped) => {
                    map.remove(&token.user.id);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Detaches a tab; the last one starts the linger timer.
    pub fn leave(self: &Arc<Self>, session: &Arc<Session>, tab_id: u64) {
        let Some(generation) = session.detach(tab_id) else {
            return;
        };
        let linger = Duration::from_millis(self.services.config.session.linger_ms);
        let (hub, session) = (self.clone(), session.clone());
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let mut map = hub.lock();
            if session.try_stop(generation)
                && map
                    .get(&session.user.id)
                    .is_some_and(|s| Arc::ptr_eq(s, &session))
            {
                map.remove(&session.user.id);
            }
        });
    }

    /// The user's session, if any.
    pub fn get(&self, user_id: &str) -> Option<Arc<Session>> {
        self.lock().get(user_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every session (for drain and broadcast).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().values().cloned().collect()
    }

    /// Stops every session now, closing their tabs with `code`.
    pub fn stop_all(&self, code: CloseCode, reason: &str) {
        let sessions: Vec<_> = self.lock().drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.stop_now(code, reason);
        }
    }
}

/// Each time the realm withdraws a signing key, every session re-checks its token ([`Session::recheck_token`]): a
/// withdrawn key (a compromised one, say) must not keep connections served until their tokens expire. One
/// signature check per session, one session at a time; ends with the hub.
pub async fn recheck_on_withdrawal(hub: Weak<Hub>) {
    let Some(mut changes) = hub.upgrade().map(|h| h.services.realm.withdrawal_changes()) else {
        return;
    };
    while changes.changed().await.is_ok() {
        let Some(sessions) = hub.upgrade().map(|h| h.all()) else {
            return;
        };
        for s in sessions {
            s.recheck_token().await;
        }
    }
}

#[cfg(test)]
mod tests;
