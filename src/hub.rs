//! The hub: `sub` -> the user's session.
//!
//! The first tab of a user creates the session, later tabs join it. When the last tab leaves, the session lingers
//! (`session.linger_ms`) so that a page reload does not restart its loops; then the hub stops it. Creating and
//! stopping both happen under the hub's lock, and a session stops only if no tab joined since it became empty
//! (its generation did not move), so closing and reopening a tab any number of times leaves exactly one session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::app::App;
use crate::auth::Verified;
use crate::close_codes::CloseCode;
use crate::session::{AttachError, Session};
use crate::tab::Tab;

#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches `tab` to its user's session, creating the session if needed.
    pub fn join(
        &self,
        app: &Arc<App>,
        token: &Verified,
        tab: &Arc<Tab>,
    ) -> Result<Arc<Session>, AttachError> {
        let mut map = self.lock();
        loop {
            let session = map
                .entry(token.user.id.clone())
                .or_insert_with(|| Session::new(app.clone(), token.user.clone()))
                .clone();
            match session.attach(tab, token) {
                Ok(()) => return Ok(session),
                Err(AttachError::Stopped) => {
                    map.remove(&token.user.id);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Detaches a tab; the last one starts the linger timer.
    pub fn leave(&self, app: &Arc<App>, session: &Arc<Session>, tab_id: u64) {
        let Some(generation) = session.detach(tab_id) else {
            return;
        };
        let linger = Duration::from_millis(app.config.session.linger_ms);
        let (app, session) = (app.clone(), session.clone());
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let mut map = app.hub.lock();
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
/// signature check per session, one session at a time; ends with the server.
pub async fn recheck_on_withdrawal(app: Weak<App>) {
    let Some(mut changes) = app.upgrade().map(|a| a.realm.withdrawal_changes()) else {
        return;
    };
    while changes.changed().await.is_ok() {
        let Some(sessions) = app.upgrade().map(|a| a.hub.all()) else {
            return;
        };
        for s in sessions {
            s.recheck_token().await;
        }
    }
}
