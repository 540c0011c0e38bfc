//! A pending login (between `/auth/login` and `/auth/callback`), sealed in a short-lived browser cookie instead of
//! kept server-side.
//!
//! Why a cookie: a server-side table of pending logins is memory that any unauthenticated peer can fill (one entry
//! per `GET /auth/login`, for the whole login timeout); sealed in the browser it costs the server nothing, any
//! instance holding the key can finish the login, and it binds the login to the browser that started it: the
//! callback's `state` must equal the one sealed in *this* browser's cookie, so a callback URL minted by an attacker
//! (login CSRF) fails in a victim's browser, which holds no such cookie.
//!
//! The cookie is AES-256-GCM (`ring::aead`): confidential (the PKCE verifier and nonce must stay unknown to whoever
//! sees the authorization request) and authenticated (a browser cannot choose its own state, verifier or redirect).
//! Each cookie has a fresh random 96-bit nonce; the time it was issued is sealed inside, so its lifetime does not
//! depend on the browser honouring `Max-Age`. Format: base64url(nonce || ciphertext || tag) of
//! `version || issued_at_ms (u64 BE) || len state || state || len nonce || nonce || len verifier || verifier ||
//! redirect`; a binary layout, so that the cookie's size follows from [`MAX_REDIRECT_BYTES`] with no escaping.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The longest `?redirect=` accepted (bytes, after normalization): it travels in the login cookie, and a cookie
/// (name and value) must stay under the 4096 bytes browsers keep.
pub const MAX_REDIRECT_BYTES: usize = 2048;

/// The longest state, nonce or PKCE verifier sealed (openidconnect's are 22, 22 and 43 characters; RFC 7636 allows
/// verifiers up to 128).
const MAX_FIELD_BYTES: usize = 128;

/// The payload format; also the associated data, so a value sealed for anything else never opens as a login.
const VERSION: u8 = 1;
const AAD: &[u8] = b"tabhub pending login v1";
const TAG_LEN: usize = 16;

/// The longest cookie value [`Sealer::seal`] produces, and the longest [`Sealer::open`] reads.
pub const MAX_COOKIE_VALUE_BYTES: usize =
    (NONCE_LEN + 1 + 8 + 3 * (1 + MAX_FIELD_BYTES) + MAX_REDIRECT_BYTES + TAG_LEN).div_ceil(3) * 4;

// Name and value of the longest cookie stay under the 4096 bytes browsers keep, with room for a long name.
const _: () = assert!(MAX_COOKIE_VALUE_BYTES + 64 < 4096);

/// Clocks of instances sharing a key may differ by this much: a cookie issued "in the future" by less is accepted.
const CLOCK_SKEW_MS: u64 = 30_000;

/// What `/auth/login` seals and `/auth/callback` needs. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingLogin {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    /// Where to send the browser after the login: already checked (relative or an allowed origin).
    pub redirect: String,
    /// Milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
}

impl std::fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLogin")
            .field("issued_at_ms", &self.issued_at_ms)
            .finish_non_exhaustive()
    }
}

/// Why a login cookie was not accepted. Both mean "start the login again"; neither says more to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Not base64, too long, tampered with, sealed with another key, or an unknown format.
    Invalid,
    /// Older than the login timeout (or issued implausibly far in the future).
    Expired,
}

/// Seals and opens pending logins with one key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

/// Milliseconds since the Unix epoch; 0 on a clock set before 1970 (every cookie then looks expired or future).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Sealer {
    /// With `key`, or with a random one when `None` (a single instance: only it can open its cookies).
    pub fn new(key: Option<[u8; 32]>) -> Result<Sealer, ring::error::Unspecified> {
        let rng = SystemRandom::new();
        let key = match key {
            Some(k) => k,
            None => {
                let mut k = [0u8; 32];
                rng.fill(&mut k)?;
                k
            }
        };
        Ok(Sealer {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key)?),
            rng,
        })
    }

    /// The cookie value for `p`; at most [`MAX_COOKIE_VALUE_BYTES`]. Fails on fields longer than the format
    /// allows (the caller checks the redirect first) or when the system's randomness fails.
    pub fn seal(&self, p: &PendingLogin) -> Result<String, ring::error::Unspecified> {
        if p.redirect.len() > MAX_REDIRECT_BYTES {
            return Err(ring::error::Unspecified);
        }
        let mut buf = Vec::with_capacity(64 + p.redirect.len() + TAG_LEN);
        buf.push(VERSION);
        buf.extend_from_slice(&p.issued_at_ms.to_be_bytes());
        for field in [&p.state, &p.nonce, &p.verifier] {
            let len = u8::try_from(field.len()).map_err(|_| ring::error::Unspecified)?;
            if usize::from(len) > MAX_FIELD_BYTES {
                return Err(ring::error::Unspecified);
            }
            buf.push(len);
            buf.extend_from_slice(field.as_bytes());
        }
        buf.extend_from_slice(p.redirect.as_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce)?;
        self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut buf,
        )?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// The pending login in a cookie value, if this key sealed it less than `timeout_ms` before `now_ms`.
    pub fn open(
        &self,
        value: &str,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<PendingLogin, OpenError> {
        if value.len() > MAX_COOKIE_VALUE_BYTES {
            return Err(OpenError::Invalid);
        }
        let mut raw = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| OpenError::Invalid)?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Invalid);
        }
        let mut sealed = raw.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&raw).map_err(|_| OpenError::Invalid)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(AAD), &mut sealed)
            .map_err(|_| OpenError::Invalid)?;
        let p = decode(plain).ok_or(OpenError::Invalid)?;
        let fresh = p.issued_at_ms <= now_ms.saturating_add(CLOCK_SKEW_MS)
            && now_ms.saturating_sub(p.issued_at_ms) < timeout_ms;
        if fresh {
            Ok(p)
        } else {
            Err(OpenError::Expired)
        }
    }
}

/// Reads the payload layout; `None` on anything but the exact format (authenticated already, so only a bug or a
/// key reused for something else gets here).
fn decode(plain: &[u8]) -> Option<PendingLogin> {
    let (&version, rest) = plain.split_first()?;
    if version != VERSION {
        return None;
    }
    let (at, mut rest) = rest.split_first_chunk::<8>()?;
    let mut field = || -> Option<String> {
        let (&len, tail) = rest.split_first()?;
        let (f, tail) = tail.split_at_checked(usize::from(len))?;
        rest = tail;
        String::from_utf8(f.to_vec()).ok()
    };
    let (state, nonce, verifier) = (field()?, field()?, field()?);
    let redirect = String::from_utf8(rest.to_vec()).ok()?;
    Some(PendingLogin {
        state,
        nonce,
        verifier,
        redirect,
        issued_at_ms: u64::from_be_bytes(*at),
    })
}

/// Equality of two secrets in time that depends on their lengths only, not on where they first differ (a state
/// compared byte by byte with an early exit would leak how much of it a guess got right).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(redirect: &str) -> PendingLogin {
        PendingLogin {
            state: "s".repeat(22),
            nonce: "n".repeat(22),
            verifier: "v".repeat(43),
            redirect: redirect.into(),
            issued_at_ms: 1_000_000,
        }
    }

    #[test]
    fn seals_and_opens_within_the_timeout_only() {
        let s = Sealer::new(None).unwrap();
        let p = pending("/projects?x=1");
        let v = s.seal(&p).unwrap();
        assert_eq!(s.open(&v, 1_000_500, 1_000).unwrap(), p);
        assert_eq!(s.open(&v, 1_001_000, 1_000), Err(OpenError::Expired));
        assert_eq!(s.open(&v, 0, 1_000), Err(OpenError::Expired));
        // A fresh nonce each time: two seals of one login differ.
        assert_ne!(s.seal(&p).unwrap(), v);
    }

    #[test]
    fn tampered_foreign_or_garbage_values_do_not_open() {
        let s = Sealer::new(Some([7; 32])).unwrap();
        let v = s.seal(&pending("/")).unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            let t = URL_SAFE_NO_PAD.encode(&raw);
            assert_eq!(s.open(&t, 1_000_000, 1_000), Err(OpenError::Invalid));
            raw[i] ^= 1;
        }
        let other = Sealer::new(Some([8; 32])).unwrap();
        assert_eq!(other.open(&v, 1_000_000, 1_000), Err(OpenError::Invalid));
        let same_key = Sealer::new(Some([7; 32])).unwrap();
        assert!(same_key.open(&v, 1_000_000, 1_000).is_ok());
        for garbage in ["", "x", "!!!!", &"A".repeat(MAX_COOKIE_VALUE_BYTES + 1)] {
            assert_eq!(s.open(garbage, 1_000_000, 1_000), Err(OpenError::Invalid));
        }
    }

    #[test]
    fn the_longest_cookie_fits_a_browser() {
        let s = Sealer::new(None).unwrap();
        let mut p = pending(&"/".repeat(MAX_REDIRECT_BYTES));
        p.verifier = "v".repeat(MAX_FIELD_BYTES);
        let v = s.seal(&p).unwrap();
        assert!(v.len() <= MAX_COOKIE_VALUE_BYTES);
        p.redirect.push('/');
        assert!(s.seal(&p).is_err());
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
