//! RSA signature checks through ring instead of RustCrypto's `rsa` crate.
//!
//! Why: with jsonwebtoken's `rust_crypto` backend an RS256 check cost about 400 us of CPU (perf: num-bigint-dig's
//! Montgomery exponentiation was half of tabhub's CPU during handshakes; README, Performance). ring does the same
//! check in a few tens of microseconds, and ring is already in the build (rustls), whereas jsonwebtoken's other
//! backend, aws-lc-rs, would add a large C build. Everything else (EC and EdDSA checks, signing, key utilities)
//! stays RustCrypto. ring refuses RSA keys under 2048 bits, as it should (Keycloak's default is 2048).
//!
//! jsonwebtoken takes its backend from a process-wide default that its first use fixes, so [`install`] runs at
//! the start of `main` and whenever an [`crate::app::App`] is built; if jsonwebtoken was used before (a test's
//! fixture minting tokens first, say), the default stays RustCrypto: same answers, slower.

use std::sync::LazyLock;

use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::signature as ring_sig;

static PROVIDER: LazyLock<CryptoProvider> = LazyLock::new(|| CryptoProvider {
    verifier_factory: verifier,
    ..rust_crypto::DEFAULT_PROVIDER.clone()
});

/// Makes ring check RSA signatures in this process. Returns whether it does (false: jsonwebtoken was used first).
pub fn install() -> bool {
    let ours: &'static CryptoProvider = &PROVIDER;
    match ours.install_default() {
        Ok(()) => true,
        Err(current) => std::ptr::eq(current, ours),
    }
}

enum RsaKey {
    /// From a JWK: modulus and exponent, big-endian.
    Components { n: Vec<u8>, e: Vec<u8> },
    /// From PEM/DER: a PKCS#1 `RSAPublicKey`.
    Der(Vec<u8>),
}

struct RingRsa {
    alg: Algorithm,
    params: &'static ring_sig::RsaParameters,
    key: RsaKey,
}

/// ring wants the modulus and exponent without leading zero bytes, which some JWKS encoders add.
fn unpadded(b: &[u8]) -> &[u8] {
    let zeros = b.iter().take_while(|&&x| x == 0).count();
    &b[zeros..]
}

impl Verifier<Vec<u8>> for RingRsa {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match &self.key {
            RsaKey::Components { n, e } => ring_sig::RsaPublicKeyComponents {
                n: unpadded(n),
                e: unpadded(e),
            }
            .verify(self.params, msg, sig),
            RsaKey::Der(der) => ring_sig::UnparsedPublicKey::new(self.params, der).verify(msg, sig),
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingRsa {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// jsonwebtoken's verifier factory: ring for RS* and PS*, RustCrypto for the rest.
fn verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    let params: &'static ring_sig::RsaParameters = match alg {
        Algorithm::RS256 => &ring_sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &ring_sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &ring_sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &ring_sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &ring_sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &ring_sig::RSA_PSS_2048_8192_SHA512,
        _ => return (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key),
    };
    if key.family() != AlgorithmFamily::Rsa {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let key = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => RsaKey::Components {
            n: n.clone(),
            e: e.clone(),
        },
        DecodingKeyKind::SecretOrDer(der) => RsaKey::Der(der.clone()),
    };
    Ok(Box::new(RingRsa {
        alg: *alg,
        params,
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const PRIVATE: &str = include_str!("../../fixtures/keys/rs256-a.pem");
    const OTHER: &str = include_str!("../../fixtures/keys/rs256-b.pem");

    fn public_of(pem: &str) -> DecodingKey {
        let k = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        let (n, e) = (rust_crypto::DEFAULT_PROVIDER
            .key_utils
            .rsa_pub_components_from_private_key)(k.as_bytes())
        .unwrap();
        DecodingKey::from_rsa_raw_components(&n, &e)
    }

    /// Signs with RustCrypto, checks with ring: the two backends agree on valid and invalid signatures.
    #[test]
    fn ring_accepts_what_rustcrypto_signs_and_refuses_the_rest() {
        let enc = EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).unwrap();
        let (good, other) = (public_of(PRIVATE), public_of(OTHER));
        for alg in [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            let token =
                jsonwebtoken::encode(&Header::new(alg), &serde_json::json!({"sub": "a"}), &enc)
                    .unwrap();
            let (message, sig) = token.rsplit_once('.').unwrap();
            let raw =
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig)
                    .unwrap();
            let check =
                |key: &DecodingKey, msg: &[u8]| verifier(&alg, key).unwrap().verify(msg, &raw);
            assert!(check(&good, message.as_bytes()).is_ok(), "{alg:?}");
            assert!(
                check(&other, message.as_bytes()).is_err(),
                "{alg:?}: another key"
            );
            let mut tampered = message.as_bytes().to_vec();
            tampered[5] ^= 1;
            assert!(check(&good, &tampered).is_err(), "{alg:?}: another message");
        }
    }

    #[test]
    fn leading_zeros_of_a_jwk_modulus_do_not_matter() {
        let k = EncodingKey::from_rsa_pem(PRIVATE.as_bytes()).unwrap();
        let (n, e) = (rust_crypto::DEFAULT_PROVIDER
            .key_utils
            .rsa_pub_components_from_private_key)(k.as_bytes())
        .unwrap();
        let padded = DecodingKey::from_rsa_raw_components(&[&[0u8][..], &n].concat(), &e);
        let msg = b"header.payload";
        let sig = jsonwebtoken::crypto::sign(msg, &k, Algorithm::RS256).unwrap();
        let raw = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &sig)
            .unwrap();
        assert!(verifier(&Algorithm::RS256, &padded)
            .unwrap()
            .verify(msg, &raw)
            .is_ok());
    }

    #[test]
    fn an_rsa_algorithm_with_a_non_rsa_key_is_refused() {
        let ec = DecodingKey::from_ec_components(
            "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        )
        .unwrap();
        assert!(verifier(&Algorithm::RS256, &ec).is_err());
    }
}
