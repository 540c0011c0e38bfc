//! What the login store keeps in Redis: key names (hashes only: no login id, user id or provider session id
//! appears in a key), the Lua scripts that change several keys at once, and the channel announcing removals.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The pub/sub channel announcing removed logins (by hash).
pub const REMOVED_CHANNEL: &str = "tabhub:logins:removed";

/// Writes a record unless the login was removed (its tombstone) or, with `only_if_absent`, is there already; adds
/// it to its index sets, each kept at least as long as the record. KEYS: record, tombstone, index sets...; ARGV:
/// sealed record, TTL ms, hash, only_if_absent (1 or 0).
pub const PUT: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[3])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1";

/// Deletes a record and leaves its tombstone; returns the record. KEYS: record, tombstone; ARGV: tombstone TTL ms.
pub const REMOVE: &str = r"
local v = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return v";

/// Releases a lock only if it still holds this holder's token. KEYS: lock; ARGV: token.
pub const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// A removal, as announced to the other instances.
#[derive(Serialize, Deserialize)]
pub struct Removed {
    /// The login's hash.
    pub login: String,
}

/// SHA-256, base64url: a login id is 256 random bits, so its hash names it without revealing it.
pub fn sha(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// The sealed token set of the login whose id hashes to `hash`.
pub fn record_key(hash: &str) -> String {
    format!("tabhub:login:{hash}")
}
/// Left by a removal: a copy written back after an outage must not bring the login back.
pub fn tombstone_key(hash: &str) -> String {
    format!("tabhub:login:{hash}:removed")
}
/// The login's refresh lock (a random fencing token).
pub fn lock_key(hash: &str) -> String {
    format!("tabhub:login:{hash}:refreshing")
}
/// The hashes of a user's logins, for back-channel logout by `sub`.
pub fn by_sub_key(sub: &str) -> String {
    format!("tabhub:logins:by-sub:{}", sha(sub))
}
/// The hashes of a provider session's logins, for back-channel logout by `sid`.
pub fn by_sid_key(sid: &str) -> String {
    format!("tabhub:logins:by-sid:{}", sha(sid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_hashes_never_the_ids() {
        let id = "a-login-id";
        let h = sha(id);
        assert_eq!(h.len(), 43);
        for k in [
            record_key(&h),
            tombstone_key(&h),
            lock_key(&h),
            by_sub_key("user-1"),
            by_sid_key("session-1"),
        ] {
            assert!(k.starts_with("tabhub:login"), "{k}");
            for secret in [id, "user-1", "session-1"] {
                assert!(!k.contains(secret), "{k}");
            }
        }
    }
}
