//! The realm's keys, the claims of the tokens it issues (as Keycloak issues them), and the verification of its
//! own tokens for introspection, userinfo and logout.
//!
//! Access and ID tokens are signed with the fixture RS256 key `fixture-rs256-a`, or `fixture-rs256-b` once `a` is
//! withdrawn (Keycloak signs with its active key); the realm recognizes any key of
//! its currently published JWKS (so rotating to `jwks-rotated.json` makes `fixture-rs256-b` tokens its own, as a
//! Keycloak realm trusts all its active keys). Refresh tokens are HS256 JWTs with a fixed fixture secret: only the
//! realm reads them, clients treat them as opaque.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use openidconnect::core::{CoreJsonWebKey, CoreJsonWebKeySet, CoreJwsSigningAlgorithm};
use openidconnect::{
    AccessToken, AccessTokenHash, JsonWebKey, PkceCodeChallenge, PkceCodeVerifier,
};
use serde_json::{json, Value};

use super::options::UserSpec;
use super::IssuerError;

const SIGNING_KEY: &str = include_str!("../../../fixtures/keys/rs256-a.pem");
pub(super) const SIGNING_KID: &str = "fixture-rs256-a";
const ROTATED_SIGNING_KEY: &str = include_str!("../../../fixtures/keys/rs256-b.pem");
const ROTATED_SIGNING_KID: &str = "fixture-rs256-b";
pub(super) const JWKS: &str = include_str!("../../../fixtures/keys/jwks.json");
pub(super) const JWKS_ROTATED: &str = include_str!("../../../fixtures/keys/jwks-rotated.json");
/// The refresh tokens' HMAC secret: a public fixture, like the keys.
const REFRESH_SECRET: &[u8] = b"tabhub-dev-issuer-refresh-token-fixture-secret-not-a-secret";

/// The event a back-channel logout token carries (OpenID Connect Back-Channel Logout 1.0).
pub(super) const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

pub(super) struct Keys {
    signing: EncodingKey,
    /// `fixture-rs256-b`, which signs once `fixture-rs256-a` is withdrawn.
    rotated_signing: EncodingKey,
    signs_rotated: AtomicBool,
    /// The signing key's public JWK, for `at_hash`.
    signing_jwk: CoreJsonWebKey,
    refresh_enc: EncodingKey,
    refresh_dec: DecodingKey,
    /// kid -> (key, algorithm) of `jwks.json` and of `jwks-rotated.json`.
    initial: HashMap<String, (DecodingKey, Algorithm)>,
    rotated: HashMap<String, (DecodingKey, Algorithm)>,
}

impl Keys {
    pub fn load() -> Result<Keys, IssuerError> {
        Ok(Keys {
            signing: EncodingKey::from_rsa_pem(SIGNING_KEY.as_bytes())?,
            rotated_signing: EncodingKey::from_rsa_pem(ROTATED_SIGNING_KEY.as_bytes())?,
            signs_rotated: AtomicBool::new(false),
            signing_jwk: signing_jwk()?,
            refresh_enc: EncodingKey::from_secret(REFRESH_SECRET),
            refresh_dec: DecodingKey::from_secret(REFRESH_SECRET),
            initial: decoding_keys(JWKS)?,
            rotated: decoding_keys(JWKS_ROTATED)?,
        })
    }

    /// The ID token's `at_hash` (left half of the RS256 hash of the access token), computed by `openidconnect`
    /// with the realm's signing JWK: the same code a client verifies it with, and no hashing crate of our own.
    pub fn at_hash(&self, access_token: &str) -> Option<String> {
        AccessTokenHash::from_token(
            &AccessToken::new(access_token.into()),
            &CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
            &self.signing_jwk,
        )
        .ok()
        .map(|h| h.as_str().to_owned())
    }

    /// Signs claims with the realm key; `typ` is the header's (`JWT` for tokens, `logout+jwt` for logout tokens).
    pub fn sign(&self, claims: &Value, typ: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let rotated = self.signs_rotated.load(Ordering::SeqCst);
        let (kid, key) = if rotated {
            (ROTATED_SIGNING_KID, &self.rotated_signing)
        } else {
            (SIGNING_KID, &self.signing)
        };
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        h.typ = Some(typ.into());
        jsonwebtoken::encode(&h, claims, key)
    }

    /// From now on, tokens are signed with `fixture-rs256-b` (the signing key was withdrawn).
    pub fn sign_with_rotated_key(&self) {
        self.signs_rotated.store(true, Ordering::SeqCst);
    }

    pub fn sign_refresh(&self, claims: &Value) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.refresh_enc)
    }

    /// The claims of a token signed by a key of the published set, with `iss` = `issuer`. `exp` is the caller's
    /// business: introspection wants the precise record, logout accepts an expired `id_token_hint`.
    pub fn verify(&self, token: &str, issuer: &str, rotated: bool) -> Option<Value> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let keys = if rotated {
            &self.rotated
        } else {
            &self.initial
        };
        let (key, alg) = keys.get(header.kid.as_deref()?)?;
        if header.alg != *alg {
            return None;
        }
        decode(token, key, *alg, issuer)
    }

    /// The claims of one of the realm's refresh tokens.
    pub fn verify_refresh(&self, token: &str, issuer: &str) -> Option<Value> {
        decode(token, &self.refresh_dec, Algorithm::HS256, issuer)
    }
}

fn decode(token: &str, key: &DecodingKey, alg: Algorithm, issuer: &str) -> Option<Value> {
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_aud = false;
    v.leeway = 0;
    v.set_required_spec_claims(&["iss"]);
    v.set_issuer(&[issuer]);
    jsonwebtoken::decode::<Value>(token, key, &v)
        .ok()
        .map(|d| d.claims)
}

fn signing_jwk() -> Result<CoreJsonWebKey, IssuerError> {
    let set: CoreJsonWebKeySet =
        serde_json::from_str(JWKS).map_err(|e| IssuerError::Keys(e.to_string()))?;
    set.keys()
        .iter()
        .find(|k| k.key_id().is_some_and(|id| id.as_str() == SIGNING_KID))
        .cloned()
        .ok_or_else(|| IssuerError::Keys(format!("{SIGNING_KID} is not in jwks.json")))
}

fn decoding_keys(jwks: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, IssuerError> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| IssuerError::Keys(e.to_string()))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let (Some(kid), Some(alg)) = (&jwk.common.key_id, &jwk.common.key_algorithm) else {
            continue;
        };
        let alg: Algorithm = alg
            .to_string()
            .parse()
            .map_err(|_| IssuerError::Keys(format!("key {kid}: unsupported alg")))?;
        keys.insert(kid.clone(), (DecodingKey::from_jwk(jwk)?, alg));
    }
    Ok(keys)
}

/// Whether `verifier` answers `challenge` (RFC 7636). The S256 transform is borrowed from `openidconnect`, which
/// already depends on SHA-256: no hashing crate of our own. (It asserts the verifier's syntax: checked first.)
pub(super) fn pkce_matches(challenge: &super::store::Challenge, verifier: &str) -> bool {
    match challenge {
        super::store::Challenge::Plain(c) => c == verifier,
        super::store::Challenge::S256(c) => {
            pkce_syntax_ok(verifier)
                && PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
                    verifier.into(),
                ))
                .as_str()
                    == c
        }
    }
}

/// RFC 7636's syntax of a verifier or a challenge: 43 to 128 unreserved characters.
pub(super) fn pkce_syntax_ok(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// What a user's tokens say, for one client in one session.
pub(super) struct Grant<'a> {
    pub issuer: &'a str,
    pub user: &'a UserSpec,
    pub client_id: &'a str,
    pub sid: &'a str,
    pub auth_time: u64,
    pub scope: &'a str,
    pub nonce: Option<&'a str>,
}

impl Grant<'_> {
    /// A Keycloak access token.
    pub fn access_claims(&self, jti: &str, iat: u64, exp: u64) -> Value {
        let u = self.user;
        let mut c = json!({
            "exp": exp,
            "iat": iat,
            "auth_time": self.auth_time,
            "jti": jti,
            "iss": self.issuer,
            "aud": "account",
            "sub": u.sub,
            "typ": "Bearer",
            "azp": self.client_id,
            "sid": self.sid,
            "session_state": self.sid,
            "acr": "1",
            "realm_access": {"roles": ["offline_access", "uma_authorization", format!("default-roles-{}", realm_of(self.issuer))]},
            "resource_access": {"account": {"roles": ["manage-account", "manage-account-links", "view-profile"]}},
            "scope": self.scope,
            "email_verified": true,
            "name": u.name,
            "preferred_username": u.username,
            "given_name": u.given_name(),
            "family_name": u.family_name(),
            "email": u.email,
        });
        if let Some(n) = self.nonce {
            c["nonce"] = json!(n);
        }
        c
    }

    /// A Keycloak ID token (`typ` `ID`, `aud` = the client).
    pub fn id_claims(&self, jti: &str, iat: u64, exp: u64, at_hash: Option<String>) -> Value {
        let u = self.user;
        let mut c = json!({
            "exp": exp,
            "iat": iat,
            "auth_time": self.auth_time,
            "jti": jti,
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": u.sub,
            "typ": "ID",
            "azp": self.client_id,
            "sid": self.sid,
            "session_state": self.sid,
            "acr": "1",
            "email_verified": true,
            "name": u.name,
            "preferred_username": u.username,
            "given_name": u.given_name(),
            "family_name": u.family_name(),
            "email": u.email,
        });
        if let Some(n) = self.nonce {
            c["nonce"] = json!(n);
        }
        if let Some(h) = at_hash {
            c["at_hash"] = json!(h);
        }
        c
    }

    /// A Keycloak refresh token (`typ` `Refresh`, `aud` = the realm).
    pub fn refresh_claims(&self, jti: &str, iat: u64, exp: u64) -> Value {
        let mut c = json!({
            "exp": exp,
            "iat": iat,
            "jti": jti,
            "iss": self.issuer,
            "aud": self.issuer,
            "sub": self.user.sub,
            "typ": "Refresh",
            "azp": self.client_id,
            "sid": self.sid,
            "session_state": self.sid,
            "scope": self.scope,
        });
        if let Some(n) = self.nonce {
            c["nonce"] = json!(n);
        }
        c
    }
}

/// A service account's access token (`client_credentials`): no session, no refresh token.
pub(super) fn service_claims(
    issuer: &str,
    client_id: &str,
    sub: &str,
    jti: &str,
    iat: u64,
    exp: u64,
) -> Value {
    json!({
        "exp": exp,
        "iat": iat,
        "jti": jti,
        "iss": issuer,
        "aud": "account",
        "sub": sub,
        "typ": "Bearer",
        "azp": client_id,
        "acr": "1",
        "realm_access": {"roles": ["offline_access", "uma_authorization", format!("default-roles-{}", realm_of(issuer))]},
        "resource_access": {"account": {"roles": ["manage-account", "manage-account-links", "view-profile"]}},
        "scope": "profile email",
        "email_verified": false,
        "clientHost": "127.0.0.1",
        "preferred_username": format!("service-account-{client_id}"),
        "clientAddress": "127.0.0.1",
        "client_id": client_id,
    })
}

/// A back-channel logout token's claims: no `nonce` (the spec forbids it), the logout event, `sid` and/or `sub`.
pub(super) fn logout_claims(
    issuer: &str,
    client_id: &str,
    sid: Option<&str>,
    sub: Option<&str>,
    jti: &str,
    iat: u64,
) -> Value {
    let mut c = json!({
        "iat": iat,
        "exp": iat + 120,
        "jti": jti,
        "iss": issuer,
        "aud": client_id,
        "events": {BACKCHANNEL_EVENT: {}},
    });
    if let Some(s) = sid {
        c["sid"] = json!(s);
    }
    if let Some(s) = sub {
        c["sub"] = json!(s);
    }
    c
}

/// The stable id of a client's service-account user, UUID-shaped like Keycloak's.
pub(super) fn service_account_sub(realm: &str, client_id: &str) -> String {
    let h = |seed: u64| {
        format!("{realm}\0{client_id}")
            .bytes()
            .fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    };
    let (a, b) = (h(0xcbf29ce484222325), h(0x84222325cbf29ce4));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn realm_of(issuer: &str) -> &str {
    issuer.rsplit('/').next().unwrap_or(issuer)
}
