//! Access tokens for the load: forged in the client processes with the fixture realm's RS256 key (kid
//! `fixture-rs256-a`, which the realm's JWKS publishes), one per user, reused by all the user's tabs. tabhub checks
//! the signature, `iss`, `azp`, `typ` and `exp`, exactly as for a real realm's tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const KEY: &str = tabhub_fixtures::keys::RS256_A;
const KID: &str = tabhub_fixtures::keys::RS256_A_KID;
/// The realm's public client; tabhub's `auth.client_ids`.
pub const CLIENT_ID: &str = "bench-ui";
/// The realm's name: the issuer is `{fixtures}/realms/bench`.
pub const REALM: &str = "bench";

/// The `sub` of bench user `i`.
pub fn sub_of(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// The bench user index of a `sub`, if it is one.
pub fn user_of_sub(sub: &str) -> Option<usize> {
    usize::from_str_radix(sub.strip_prefix("00000000-0000-4000-8000-")?, 16).ok()
}

/// User `i`'s own project on the fixture GitLab: numeric, as GitLab's project ids (webhooks name projects by id).
pub fn project_of(i: usize) -> String {
    (1_000_000 + i).to_string()
}

/// The event types of the `n` topics each tab holds on its user's project.
pub fn event_types(n: usize) -> Vec<String> {
    const NAMED: &[&str] = &["push", "pipeline", "merge_request", "issue", "note"];
    (0..n)
        .map(|k| {
            NAMED
                .get(k)
                .map_or_else(|| format!("e{k}"), |s| (*s).to_owned())
        })
        .collect()
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs access tokens for `users`, in `threads` threads (about 1-2 ms each).
pub fn mint_all(issuer: &str, users: &[usize], threads: usize, lifetime_s: u64) -> Vec<String> {
    let key = EncodingKey::from_rsa_pem(KEY.as_bytes()).expect("the fixture key parses");
    let threads = threads.max(1);
    let chunk = users.len().div_ceil(threads).max(1);
    let now = now_unix();
    std::thread::scope(|scope| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                let key = &key;
                scope.spawn(move || {
                    part.iter()
                        .map(|&u| forge(key, issuer, u, now, lifetime_s))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("minting thread"))
            .collect()
    })
}

fn forge(key: &EncodingKey, issuer: &str, user: usize, now: u64, lifetime_s: u64) -> String {
    let claims = json!({
        "exp": now + lifetime_s,
        "iat": now,
        "jti": format!("bench-{user}-{now}"),
        "iss": issuer,
        "aud": "account",
        "sub": sub_of(user),
        "typ": "Bearer",
        "azp": CLIENT_ID,
        "sid": format!("bench-sid-{user}"),
        "preferred_username": format!("u{user}"),
        "scope": "openid profile email",
    });
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(KID.into());
    jsonwebtoken::encode(&h, &claims, key).expect("the fixture key signs")
}

/// The `sub` of a bearer JWT, read without verification (the fixture gateway only attributes calls).
pub fn bearer_sub(authorization: Option<&str>) -> Option<String> {
    let token = authorization?.strip_prefix("Bearer ")?;
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("sub")?.as_str().map(str::to_owned)
}
