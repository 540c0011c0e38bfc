//! Authentication against a Keycloak realm: discovery and keys ([`realm`]), access-token verification
//! ([`verify`]), and where a handshake's credential comes from ([`credential`]).

pub mod credential;
pub mod crypto;
pub mod realm;
pub mod verify;

pub use realm::{Discovery, Realm};
pub use verify::{AuthError, Verified};

use jsonwebtoken::Algorithm;

/// Parses an accepted algorithm name. Symmetric algorithms (HS*) are refused: a realm's public key must never be
/// usable as an HMAC secret. `none` is not even an algorithm to jsonwebtoken.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, &'static str> {
    let alg: Algorithm = name.parse().map_err(|_| {
        "unknown algorithm (use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"
    })?;
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            Err("HMAC algorithms are refused: only asymmetric signatures are accepted")
        }
        _ => Ok(alg),
    }
}
