//! The realm's memory: Keycloak sessions, authorization codes, and the refresh and access tokens it issued. Every
//! method is synchronous: the issuer holds the lock only inside them, never across an `.await`.
//!
//! Revocation works as in Keycloak: tokens carry the session id (`sid`), and a token whose session is gone is no
//! longer active, whatever its `exp`.

use std::collections::{BTreeSet, HashMap};

/// A Keycloak user session (an SSO login), shared by the clients the user used it with.
pub(super) struct KcSession {
    pub username: String,
    /// When the user authenticated, in seconds since the epoch (`auth_time`).
    pub auth_time: u64,
    /// The clients that received tokens in this session: their back-channel logout URLs are called when it ends.
    pub clients: BTreeSet<String>,
}

/// A PKCE challenge stored with an authorization code.
#[derive(Debug, Clone)]
pub(super) enum Challenge {
    Plain(String),
    S256(String),
}

/// An authorization code waiting for its exchange.
pub(super) struct Code {
    pub client_id: String,
    pub redirect_uri: String,
    pub sid: String,
    pub nonce: Option<String>,
    pub scope: String,
    pub challenge: Option<Challenge>,
    pub exp_ms: u64,
}

/// The refresh token currently valid for one client in one session (rotation: one at a time).
pub(super) struct RefreshRecord {
    pub sid: String,
    pub scope: String,
    pub nonce: Option<String>,
    pub exp_ms: u64,
}

/// An access token the realm issued: its precise expiry (the JWT's `exp` has only seconds; its `sid` is checked
/// against the sessions).
pub(super) struct AccessRecord {
    pub exp_ms: u64,
}

#[derive(Default)]
pub(super) struct Store {
    sessions: HashMap<String, KcSession>,
    /// user name -> id of the user's latest session, ended or not.
    latest: HashMap<String, String>,
    codes: HashMap<String, Code>,
    /// refresh token `jti` -> record.
    refresh: HashMap<String, RefreshRecord>,
    /// access token `jti` -> record.
    access: HashMap<String, AccessRecord>,
}

impl Store {
    /// Logs `username` in: a new session, whose id is returned.
    pub fn open_session(&mut self, username: &str, now_ms: u64) -> String {
        let sid = uuid();
        self.sessions.insert(
            sid.clone(),
            KcSession {
                username: username.into(),
                auth_time: now_ms / 1000,
                clients: BTreeSet::new(),
            },
        );
        self.latest.insert(username.into(), sid.clone());
        sid
    }

    pub fn session(&self, sid: &str) -> Option<&KcSession> {
        self.sessions.get(sid)
    }

    pub fn is_active(&self, sid: &str) -> bool {
        self.sessions.contains_key(sid)
    }

    /// Records that `client_id` received tokens in session `sid`; false when the session is not active.
    pub fn join(&mut self, sid: &str, client_id: &str) -> bool {
        match self.sessions.get_mut(sid) {
            Some(s) => {
                s.clients.insert(client_id.into());
                true
            }
            None => false,
        }
    }

    pub fn latest_session_of(&self, username: &str) -> Option<String> {
        self.latest.get(username).cloned()
    }

    /// Ends a session: its codes and refresh tokens go with it; its access tokens stop introspecting active.
    pub fn end_session(&mut self, sid: &str) -> Option<KcSession> {
        let s = self.sessions.remove(sid)?;
        self.codes.retain(|_, c| c.sid != sid);
        self.refresh.retain(|_, r| r.sid != sid);
        Some(s)
    }

    /// Ends every session of `username`; returns their ids and contents.
    pub fn end_sessions_of(&mut self, username: &str) -> Vec<(String, KcSession)> {
        let sids: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.username == username)
            .map(|(sid, _)| sid.clone())
            .collect();
        sids.into_iter()
            .filter_map(|sid| self.end_session(&sid).map(|s| (sid, s)))
            .collect()
    }

    pub fn add_code(&mut self, code: Code, now_ms: u64) -> String {
        self.prune(now_ms);
        let id = format!("{}.{}.{}", uuid(), code.sid, uuid());
        self.codes.insert(id.clone(), code);
        id
    }

    /// Removes and returns a code: single use, even when the exchange then fails (as Keycloak).
    pub fn take_code(&mut self, id: &str, now_ms: u64) -> Option<Code> {
        self.codes.remove(id).filter(|c| c.exp_ms > now_ms)
    }

    pub fn add_refresh(&mut self, jti: &str, record: RefreshRecord, now_ms: u64) {
        self.prune(now_ms);
        self.refresh.insert(jti.into(), record);
    }

    /// Removes and returns a refresh token's record: rotation makes each refresh token single use.
    pub fn take_refresh(&mut self, jti: &str) -> Option<RefreshRecord> {
        self.refresh.remove(jti)
    }

    pub fn refresh(&self, jti: &str) -> Option<&RefreshRecord> {
        self.refresh.get(jti)
    }

    pub fn add_access(&mut self, jti: &str, record: AccessRecord, now_ms: u64) {
        self.prune(now_ms);
        self.access.insert(jti.into(), record);
    }

    pub fn access(&self, jti: &str) -> Option<&AccessRecord> {
        self.access.get(jti)
    }

    /// Forgets expired codes and tokens, so that a long demo does not grow without bound.
    fn prune(&mut self, now_ms: u64) {
        self.codes.retain(|_, c| c.exp_ms > now_ms);
        self.refresh.retain(|_, r| r.exp_ms > now_ms);
        self.access.retain(|_, a| a.exp_ms > now_ms);
    }
}

/// A random UUID (version 4), the shape of Keycloak's ids.
pub(super) fn uuid() -> String {
    let v = (rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
