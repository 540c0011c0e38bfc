//! Which signature algorithms a realm may use. A leaf: the configuration checks its `auth.algorithms` with it.

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
