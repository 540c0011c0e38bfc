//! The fixture Keycloak realm `test`: tabhub's own fake Keycloak ([`DevIssuer`]) on a real socket, with the test
//! users and clients, plus `mint` to forge arbitrary tokens (other keys, algorithms, claims) with the fixture keys.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tabhub_fixtures::issuer::{ClientSpec, DevIssuer, RealmOptions, UserSpec};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/keys");

/// The test users (password = user name).
pub const USERS: &[&str] = &["alice", "bob", "erin", "mallory"];
/// The browser client: public. Its access tokens are what tabhub's test configuration accepts.
pub const UI_CLIENT: &str = "renku-ui";
/// tabhub's own confidential client.
pub const TABHUB_CLIENT: &str = "tabhub";
pub const TABHUB_SECRET: &str = "test-secret";
/// A service account client.
pub const PUBLISHER_CLIENT: &str = "publisher";
pub const PUBLISHER_SECRET: &str = "publisher-secret";

fn read_key(name: &str) -> String {
    std::fs::read_to_string(format!("{KEYS}/{name}")).unwrap()
}

pub struct Keycloak {
    pub addr: SocketAddr,
    realm: Arc<DevIssuer>,
    /// The users `token` gets from the realm (all of them, when the realm has the `renku-ui` client).
    realm_users: Vec<String>,
}

/// What a minted token says and how it is signed.
#[derive(Clone)]
pub struct TokenSpec {
    pub user: String,
    /// Signing key file (`rs256-a.pem`, `es256-a.pem`, `rs256-b.pem`, `rogue.pem`) or `hmac` / `none`.
    pub key: String,
    pub kid: Option<String>,
    pub iss: Option<String>,
    pub azp: String,
    pub aud: Value,
    pub typ: String,
    /// Seconds from now (negative: already expired).
    pub exp_in: i64,
    pub nbf_in: Option<i64>,
    /// The JOSE header's `typ` (`at+jwt` for an RFC 9068 access token); `None`: jsonwebtoken's `JWT`.
    pub header_typ: Option<String>,
    /// Claims set last, over the ones above: anything a forger may put in a token (`iss` as an array, an absurd
    /// `exp`...).
    pub claims: serde_json::Map<String, Value>,
    /// Claims taken out last.
    pub removed: Vec<String>,
}

impl TokenSpec {
    pub fn user(user: &str) -> Self {
        TokenSpec {
            user: user.into(),
            key: "rs256-a.pem".into(),
            kid: Some("fixture-rs256-a".into()),
            iss: None,
            azp: "renku-ui".into(),
            aud: json!("account"),
            typ: "Bearer".into(),
            exp_in: 300,
            nbf_in: None,
            header_typ: None,
            claims: serde_json::Map::new(),
            removed: Vec::new(),
        }
    }
    /// Sets `name` to `value` in the claims, whatever the other fields say.
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.removed.retain(|n| n != name);
        self.claims.insert(name.into(), value);
        self
    }
    pub fn exp_in(mut self, s: i64) -> Self {
        self.exp_in = s;
        self
    }
    /// Removes claim `name` (`typ`, `azp`...), whatever the other fields say.
    pub fn without(mut self, name: &str) -> Self {
        self.claims.remove(name);
        self.removed.push(name.into());
        self
    }
    /// An RFC 9068 access token of `client`: `typ` header `at+jwt`, no `typ` claim, the client in `client_id`
    /// (no `azp`), `aud` a resource server.
    pub fn rfc9068(user: &str, client: &str) -> Self {
        TokenSpec {
            header_typ: Some("at+jwt".into()),
            aud: json!("https://tabhub.example"),
            ..TokenSpec::user(user)
        }
        .without("typ")
        .without("azp")
        .claim("client_id", json!(client))
        .claim("scope", json!("openid profile"))
    }
    pub fn key(mut self, file: &str, kid: &str) -> Self {
        self.key = file.into();
        self.kid = Some(kid.into());
        self
    }
}

/// The `sub` of a test user: a stable UUID-like id derived from the name.
pub fn sub_of(user: &str) -> String {
    format!(
        "00000000-0000-4000-8000-{:012x}",
        fnv(user) & 0xffff_ffff_ffff
    )
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The options of the realm `test`.
pub fn test_realm() -> RealmOptions {
    RealmOptions {
        realm: "test".into(),
        clients: vec![
            ClientSpec::public(UI_CLIENT, &["*"]),
            ClientSpec::confidential(TABHUB_CLIENT, TABHUB_SECRET, &["*"]),
            ClientSpec::service_account(PUBLISHER_CLIENT, PUBLISHER_SECRET),
        ],
        users: USERS
            .iter()
            .map(|u| UserSpec {
                username: u.to_string(),
                password: u.to_string(),
                sub: sub_of(u),
                email: format!("{u}@example.org"),
                name: format!("{u} Tester"),
            })
            .collect(),
        access_token_lifetime: Duration::from_secs(300),
        refresh_token_lifetime: Duration::from_secs(1800),
        auto_approve: None,
    }
}

impl Keycloak {
    /// Starts the realm `test`, serving `jwks.json`.
    pub async fn start() -> Keycloak {
        Keycloak::start_with(|_| {}).await
    }

    /// Starts the realm `test` with options changed by `f` (e.g. `auto_approve`, lifetimes, more clients).
    pub async fn start_with(f: impl FnOnce(&mut RealmOptions)) -> Keycloak {
        // As tabhub's main does, before the fixture mints anything: the tests check RSA signatures with ring.
        assert!(
            tabhub::auth::crypto::install(),
            "jsonwebtoken was used before ring could be installed"
        );
        let mut opts = test_realm();
        f(&mut opts);
        let realm_users = if opts.clients.iter().any(|c| c.id == UI_CLIENT) {
            opts.users.iter().map(|u| u.username.clone()).collect()
        } else {
            Vec::new()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let realm = DevIssuer::new(&format!("http://{addr}"), opts).unwrap();
        let app = realm.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Keycloak {
            addr,
            realm,
            realm_users,
        }
    }

    /// The realm itself: every knob of [`DevIssuer`].
    pub fn realm(&self) -> &Arc<DevIssuer> {
        &self.realm
    }

    pub fn issuer(&self) -> String {
        self.realm.issuer().to_owned()
    }

    /// Publishes the rotated key set (adds `fixture-rs256-b`).
    pub fn rotate_keys(&self) {
        self.realm.rotate_keys();
    }

    /// Takes `kid` out of the published key set (and the realm stops accepting its tokens).
    pub fn withdraw_key(&self, kid: &str) {
        self.realm.withdraw_key(kid);
    }

    pub fn jwks_fetches(&self) -> usize {
        self.realm.jwks_fetches()
    }

    /// An access token for `user` from the realm, as after a login to `renku-ui` (a real session: it introspects
    /// active until the session ends). A user not in the realm gets a forged one with the realm's main key.
    pub fn token(&self, user: &str) -> String {
        if self.realm_users.iter().any(|u| u == user) {
            self.realm.mint_access(user, UI_CLIENT)
        } else {
            self.mint(&TokenSpec::user(user))
        }
    }

    /// A token as `spec` describes.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let t = now();
        let mut claims = json!({
            "exp": t + spec.exp_in,
            "iat": t,
            "jti": format!("{:x}", rand::random::<u64>()),
            "iss": spec.iss.clone().unwrap_or_else(|| self.issuer()),
            "aud": spec.aud,
            "sub": sub_of(&spec.user),
            "typ": spec.typ,
            "azp": spec.azp,
            "sid": format!("sid-{}", spec.user),
            "preferred_username": spec.user,
        });
        if let Some(n) = spec.nbf_in {
            claims["nbf"] = json!(t + n);
        }
        for (name, value) in &spec.claims {
            claims[name] = value.clone();
        }
        if let Some(c) = claims.as_object_mut() {
            for name in &spec.removed {
                c.remove(name);
            }
        }
        match spec.key.as_str() {
            "none" => {
                let b64 = |v: &Value| {
                    use base64::Engine;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
                };
                format!(
                    "{}.{}.",
                    b64(&json!({"alg": "none", "typ": "JWT"})),
                    b64(&claims)
                )
            }
            "hmac" => {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = spec.kid.clone();
                // An attacker's classic: sign with HMAC using the realm's public key as the secret.
                jsonwebtoken::encode(
                    &h,
                    &claims,
                    &EncodingKey::from_secret(read_key("jwks.json").as_bytes()),
                )
                .unwrap()
            }
            file => {
                let pem = read_key(file);
                let (alg, key) = if file.starts_with("es") {
                    (
                        Algorithm::ES256,
                        EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
                    )
                } else {
                    (
                        Algorithm::RS256,
                        EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                    )
                };
                let mut h = Header::new(alg);
                h.kid = spec.kid.clone();
                if let Some(typ) = &spec.header_typ {
                    h.typ = Some(typ.clone());
                }
                jsonwebtoken::encode(&h, &claims, &key).unwrap()
            }
        }
    }
}
