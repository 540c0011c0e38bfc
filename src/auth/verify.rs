//! Token verification: signature with the realm's keys, `iss` exactly, `exp`/`nbf` with a small leeway; then, for
//! access tokens, the rule of [`super::kind`] (what the token is, and for which client).
//!
//! Two claim checks are tabhub's own, on top of jsonwebtoken's: `iss` must be one JSON string equal to
//! `auth.issuer` (jsonwebtoken accepts an array that contains the issuer, even `[evil, issuer]`), and `exp`, when
//! present, an integer at most [`MAX_EXP_AHEAD_SECS`] ahead (an `exp` of `u64::MAX` once overflowed the cache's
//! expiry check: accepted once, then "expired"). Time arithmetic on claims saturates.
//!
//! Error texts are sent to clients: they say what is wrong, never echo the token.

use std::collections::HashSet;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tabhub_commands::User;

use super::kind::{self, Accepted, Rule};
use super::realm::{Key, KeyKind, Loaded, Realm};
use super::verified::{AuthError, Verified};
use crate::config::parse_algorithm;

/// The furthest ahead an `exp` may be: ten years. No identity provider issues tokens for longer (Keycloak's are
/// minutes to days); a larger value is a forgery or a bug, and the arithmetic on it (expiry checks, timers) must
/// never see it.
pub const MAX_EXP_AHEAD_SECS: u64 = 10 * 366 * 24 * 3600;

/// The claims of a user's access token that tabhub reads (what the token is was decided by [`kind::accept`]).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    preferred_username: Option<String>,
    #[serde(default)]
    sid: Option<String>,
}

impl Realm {
    /// Verifies a JWT signed by the realm: accepted algorithm, known key (see [`Realm::key_set_with`] for an
    /// unknown `kid`), signature, `iss` exactly; `exp`/`nbf` with the leeway. `configure` adjusts the validation
    /// (required claims, audience) for the kind of token. Says nothing of what the token is for: access tokens go
    /// through [`Realm::verify_access`].
    pub async fn verify_jwt<T: DeserializeOwned>(
        &self,
        token: &str,
        configure: impl FnOnce(&mut Validation),
    ) -> Result<T, AuthError> {
        let (_, claims) = self.verify_signed(token, configure).await?;
        serde_json::from_value(claims).map_err(|_| AuthError::Invalid("malformed token"))
    }

    /// [`Realm::verify_jwt`], giving the JOSE header and the claims as JSON.
    pub async fn verify_signed(
        &self,
        token: &str,
        configure: impl FnOnce(&mut Validation),
    ) -> Result<(Header, Value), AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let accepted: Vec<Algorithm> = self
            .config()
            .algorithms
            .iter()
            .filter_map(|a| parse_algorithm(a).ok())
            .collect();
        if !accepted.contains(&header.alg) {
            return Err(AuthError::Invalid("signature algorithm not accepted"));
        }
        let kid = header.kid.as_deref();
        let loaded = self
            .key_set_with(kid.unwrap_or(""), |l| {
                find_key(l, kid, header.alg).is_some()
            })
            .await?;
        let key =
            find_key(&loaded, kid, header.alg).ok_or(AuthError::Invalid("unknown signing key"))?;

        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.config().issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = self.config().leeway_secs;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.aud = None::<HashSet<String>>;
        configure(&mut validation);
        // Decoded as JSON first, so that the shapes jsonwebtoken tolerates can be refused (see `check_claims`).
        let data =
            jsonwebtoken::decode::<Value>(token, &key.decoding, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => AuthError::Expired,
                    K::InvalidSignature => AuthError::Invalid("bad signature"),
                    K::InvalidIssuer => AuthError::Invalid("wrong issuer"),
                    K::InvalidAudience => AuthError::Invalid("wrong audience"),
                    K::ImmatureSignature => AuthError::Invalid("token not valid yet (nbf)"),
                    K::MissingRequiredClaim(_) => AuthError::Invalid("a required claim is missing"),
                    K::InvalidAlgorithm => AuthError::Invalid("algorithm does not match the key"),
                    _ => AuthError::Invalid("malformed token"),
                }
            })?;
        check_claims(&data.claims, &self.config().issuer, now_secs())?;
        Ok((header, data.claims))
    }

    /// Verifies an access token of one of `clients` (the publish API's rule: `publish.clients`), with the same
    /// signature checks and the same rule of what an access token is as every other entry point. Uncached.
    pub async fn verify_access(
        &self,
        token: &str,
        clients: &[String],
    ) -> Result<(Accepted, Value), VerifyError> {
        let (header, claims) = self.verify_signed(token, |_| {}).await?;
        let rule = Rule {
            clients,
            allow_unmarked: !self.config().require_typ_bearer,
        };
        let accepted = kind::accept(&header, &claims, &rule).map_err(VerifyError::Refused)?;
        Ok((accepted, claims))
    }

    /// Verifies an access token (answers from the cache of verified tokens when it can).
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        if let Some(v) = self.verified.get(token) {
            if now_secs() > v.exp.saturating_add(self.config().leeway_secs) {
                self.verified.invalidate(token);
                return Err(AuthError::Expired);
            }
            return Ok(v);
        }
        let withdrawals = self.withdrawals();
        let v = self.verify_uncached(token).await?;
        self.verified.insert(v.token.clone(), v.clone());
        if self.withdrawals() != withdrawals {
            // A key was withdrawn meanwhile, perhaps the one this token was verified with.
            self.verified.invalidate(token);
        }
        Ok(v)
    }

    /// Verifies a user's access token (of a client in `auth.client_ids`) without the cache of verified tokens.
    pub(crate) async fn verify_uncached(&self, token: &str) -> Result<Verified, AuthError> {
        let (accepted, claims) = self
            .verify_access(token, &self.config().client_ids)
            .await
            .map_err(AuthError::from)?;
        let claims: Claims =
            serde_json::from_value(claims).map_err(|_| AuthError::Invalid("malformed token"))?;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty sub"));
        }
        Ok(Verified {
            user: User {
                name: claims
                    .preferred_username
                    .unwrap_or_else(|| claims.sub.clone()),
                id: claims.sub,
            },
            exp: claims.exp,
            sid: claims.sid,
            azp: Some(accepted.client),
            token: Arc::from(token),
            login: None,
            anonymous: false,
        })
    }
}

/// Why [`Realm::verify_access`] refused a token: its signature or claims, or what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    Auth(AuthError),
    Refused(kind::Refusal),
}

impl From<AuthError> for VerifyError {
    fn from(e: AuthError) -> Self {
        VerifyError::Auth(e)
    }
}

impl From<VerifyError> for AuthError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Auth(e) => e,
            VerifyError::Refused(r) => r.into(),
        }
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// tabhub's own claim checks, after jsonwebtoken's: `iss` (when present; jsonwebtoken requires it unless told
/// otherwise) is one string equal to `issuer`, and `exp` (when present) an integer no further than
/// [`MAX_EXP_AHEAD_SECS`] from `now`.
fn check_claims(claims: &Value, issuer: &str, now: u64) -> Result<(), AuthError> {
    match claims.get("iss") {
        None => {}
        Some(Value::String(iss)) if iss == issuer => {}
        Some(_) => return Err(AuthError::Invalid("wrong issuer (iss must be one string)")),
    }
    match claims.get("exp").map(Value::as_u64) {
        None => {}
        Some(Some(exp)) if exp <= now.saturating_add(MAX_EXP_AHEAD_SECS) => {}
        Some(_) => return Err(AuthError::Invalid("exp is not a time within ten years")),
    }
    Ok(())
}

/// The key a token names. Without a `kid`, the realm's only key of the right kind.
fn find_key<'a>(loaded: &'a Loaded, kid: Option<&str>, alg: Algorithm) -> Option<&'a Key> {
    let fits = |k: &Key| k.kind == kind_of(alg) && k.alg.is_none_or(|a| a == alg);
    match kid {
        Some(kid) => loaded.keys.get(kid).filter(|k| fits(k)),
        None => {
            let mut candidates = loaded.keys.values().filter(|k| fits(k));
            let only = candidates.next()?;
            candidates.next().is_none().then_some(only)
        }
    }
}

fn kind_of(alg: Algorithm) -> KeyKind {
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => KeyKind::Ec,
        Algorithm::EdDSA => KeyKind::Ed,
        _ => KeyKind::Rsa,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ISS: &str = "https://kc.example/realms/r";
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn iss_must_be_the_one_issuer_string() {
        assert!(check_claims(&json!({ "iss": ISS }), ISS, NOW).is_ok());
        assert!(
            check_claims(&json!({}), ISS, NOW).is_ok(),
            "required or not: jsonwebtoken's call"
        );
        for iss in [
            json!([ISS]),
            json!(["https://evil.example", ISS]),
            json!({ "iss": ISS }),
            json!(null),
            json!(format!("{ISS}/")),
            json!("https://evil.example"),
        ] {
            assert!(
                matches!(
                    check_claims(&json!({ "iss": iss }), ISS, NOW),
                    Err(AuthError::Invalid(_))
                ),
                "{iss}"
            );
        }
    }

    #[test]
    fn exp_must_be_an_integer_within_ten_years() {
        let ok = |exp: Value| check_claims(&json!({ "iss": ISS, "exp": exp }), ISS, NOW).is_ok();
        assert!(ok(json!(NOW + 300)));
        assert!(ok(json!(NOW - 300)), "expiry is jsonwebtoken's check");
        assert!(ok(json!(NOW + MAX_EXP_AHEAD_SECS)));
        assert!(!ok(json!(NOW + MAX_EXP_AHEAD_SECS + 1)));
        assert!(!ok(json!(u64::MAX)));
        assert!(!ok(json!(1u64 << 63)));
        assert!(!ok(json!(1u64 << 53)));
        assert!(!ok(json!(1e300)));
        assert!(!ok(json!(NOW as f64 + 0.5)));
        assert!(!ok(json!(-1)));
        assert!(!ok(json!("1800000000")));
        // The bound itself never overflows.
        assert!(check_claims(&json!({ "exp": u64::MAX }), ISS, u64::MAX).is_ok());
    }
}
