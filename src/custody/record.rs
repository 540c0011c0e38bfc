//! A login's token set as kept in a shared store (Redis): JSON sealed with AES-256-GCM (`ring::aead`), so that
//! whoever reads the store (a backup, a replica, `MONITOR`) learns no token.
//!
//! Keys rotate: `custody.store_keys` lists keys newest first; the newest seals, every listed key opens (AES-GCM's
//! tag tells which one sealed a record, so no key id is stored). A record is bound to the store key it lives under
//! (the associated data), so a record copied under another login's key does not open. Format: `nonce || ciphertext
//! || tag`, the plaintext a [`Record`] in JSON, its expiry in wall-clock milliseconds (an `Instant` means nothing in
//! another process).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tabhub_commands::User;

use super::store::StoredLogin;

/// The associated data's prefix: a value sealed for anything else never opens as a login.
const AAD_PREFIX: &[u8] = b"tabhub login v1 ";

/// What is sealed. Never logged.
#[derive(Serialize, Deserialize)]
struct Record {
    user_id: String,
    user_name: String,
    kc_sid: Option<String>,
    access_token: String,
    access_exp: u64,
    refresh_token: String,
    /// Milliseconds since the Unix epoch.
    refresh_expires_ms: u64,
    id_token: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seals with the newest key, opens with any.
pub struct Keys {
    keys: Vec<LessSafeKey>,
    rng: SystemRandom,
}

impl Keys {
    /// `None` without a key: a shared store never keeps tokens in the clear.
    pub fn new(raw: &[[u8; 32]]) -> Option<Keys> {
        let keys = raw
            .iter()
            .filter_map(|k| UnboundKey::new(&AES_256_GCM, k).ok().map(LessSafeKey::new))
            .collect::<Vec<_>>();
        (!keys.is_empty() && keys.len() == raw.len()).then(|| Keys {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// `login` sealed for the store key `name`; `None` only if the system's random source fails.
    pub fn seal(&self, name: &str, login: &StoredLogin) -> Option<Vec<u8>> {
        let remaining = login
            .refresh_expires
            .saturating_duration_since(Instant::now());
        let record = Record {
            user_id: login.user.id.clone(),
            user_name: login.user.name.clone(),
            kc_sid: login.kc_sid.clone(),
            access_token: login.access_token.to_string(),
            access_exp: login.access_exp,
            refresh_token: login.refresh_token.to_string(),
            refresh_expires_ms: now_ms() + remaining.as_millis() as u64,
            id_token: login.id_token.as_deref().map(str::to_owned),
        };
        let mut data = serde_json::to_vec(&record).ok()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let aad = [AAD_PREFIX, name.as_bytes()].concat();
        self.keys[0]
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .ok()?;
        Some([nonce.as_slice(), &data].concat())
    }

    /// The login sealed under `name` by any listed key; `None` when no key opens it (tampered, foreign, or sealed
    /// with a key no longer listed) or it is malformed.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Option<StoredLogin> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let aad = [AAD_PREFIX, name.as_bytes()].concat();
        let record = self.keys.iter().find_map(|key| {
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut buf = body.to_vec();
            let plain = key
                .open_in_place(nonce, Aad::from(aad.as_slice()), &mut buf)
                .ok()?;
            serde_json::from_slice::<Record>(plain).ok()
        })?;
        let remaining = Duration::from_millis(record.refresh_expires_ms.saturating_sub(now_ms()));
        Some(StoredLogin {
            user: User {
                id: record.user_id,
                name: record.user_name,
            },
            kc_sid: record.kc_sid,
            access_token: Arc::from(record.access_token),
            access_exp: record.access_exp,
            refresh_token: Arc::from(record.refresh_token),
            refresh_expires: Instant::now() + remaining,
            id_token: record.id_token.map(Arc::from),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> StoredLogin {
        StoredLogin {
            user: User {
                id: "u1".into(),
                name: "alice".into(),
            },
            kc_sid: Some("s1".into()),
            access_token: Arc::from("access"),
            access_exp: 42,
            refresh_token: Arc::from("refresh"),
            refresh_expires: Instant::now() + Duration::from_secs(600),
            id_token: None,
        }
    }

    #[test]
    fn an_old_key_still_opens_after_rotation_and_the_newest_seals() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let sealed_old = Keys::new(&[old]).unwrap().seal("k", &login()).unwrap();
        let rotated = Keys::new(&[new, old]).unwrap();
        let opened = rotated.open("k", &sealed_old).expect("old key still opens");
        assert_eq!(&*opened.refresh_token, "refresh");
        assert_eq!(opened.user.name, "alice");
        assert!(opened.refresh_expires > Instant::now() + Duration::from_secs(590));
        let sealed_new = rotated.seal("k", &login()).unwrap();
        assert!(Keys::new(&[new]).unwrap().open("k", &sealed_new).is_some());
        assert!(
            Keys::new(&[old]).unwrap().open("k", &sealed_new).is_none(),
            "sealed with the newest key"
        );
    }

    #[test]
    fn a_record_opens_only_under_its_own_name_and_untampered() {
        let keys = Keys::new(&[[3u8; 32]]).unwrap();
        let mut sealed = keys.seal("k1", &login()).unwrap();
        assert!(keys.open("k2", &sealed).is_none());
        assert!(keys.open("k1", &sealed[..5]).is_none());
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(keys.open("k1", &sealed).is_none());
        assert!(Keys::new(&[]).is_none());
    }
}
