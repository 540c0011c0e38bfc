//! What a realm holds: its clients, its users and its token lifetimes, as plain data so that the demo and each test
//! can describe the realm they need.

use std::time::Duration;

/// A client of the realm, as an administrator would register it in Keycloak.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub id: String,
    /// Confidential (must authenticate at the token and introspection endpoints) when set; public otherwise.
    pub secret: Option<String>,
    /// Valid redirect URIs, Keycloak style: an exact URI, or a prefix ending with `*` (`*` alone accepts any
    /// absolute URI). Also the valid post-logout redirect URIs (Keycloak's `+` default).
    pub redirect_uris: Vec<String>,
    /// Service account enabled: `grant_type=client_credentials` (needs a secret).
    pub service_account: bool,
    /// Where the realm POSTs back-channel logout tokens when a session of this client ends by RP-initiated logout.
    pub backchannel_logout_url: Option<String>,
}

impl ClientSpec {
    /// A public client (a browser application: no secret).
    pub fn public(id: &str, redirect_uris: &[&str]) -> Self {
        ClientSpec {
            id: id.into(),
            secret: None,
            redirect_uris: redirect_uris.iter().map(|u| u.to_string()).collect(),
            service_account: false,
            backchannel_logout_url: None,
        }
    }

    /// A confidential client (a server: authenticates with `secret`).
    pub fn confidential(id: &str, secret: &str, redirect_uris: &[&str]) -> Self {
        ClientSpec {
            secret: Some(secret.into()),
            ..ClientSpec::public(id, redirect_uris)
        }
    }

    /// A confidential client with only a service account (`client_credentials`), no browser login.
    pub fn service_account(id: &str, secret: &str) -> Self {
        ClientSpec {
            service_account: true,
            ..ClientSpec::confidential(id, secret, &[])
        }
    }

    pub fn is_confidential(&self) -> bool {
        self.secret.is_some()
    }

    /// Whether `uri` is one of the client's redirect URIs. It must also be an absolute URI: the realm appends
    /// query parameters to it, and `*` would otherwise accept anything.
    pub fn accepts_redirect(&self, uri: &str) -> bool {
        if url::Url::parse(uri).is_err() {
            return false;
        }
        self.redirect_uris
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => uri.starts_with(prefix),
                None => uri == p,
            })
    }
}

/// A user of the realm.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub username: String,
    pub password: String,
    /// The stable user id, as Keycloak's UUIDs.
    pub sub: String,
    pub email: String,
    /// Full name; its first word is the `given_name`, the rest the `family_name`.
    pub name: String,
}

impl UserSpec {
    pub(super) fn given_name(&self) -> &str {
        self.name.split_whitespace().next().unwrap_or("")
    }

    pub(super) fn family_name(&self) -> &str {
        self.name
            .split_once(char::is_whitespace)
            .map(|(_, f)| f.trim())
            .unwrap_or("")
    }
}

/// A whole realm.
#[derive(Debug, Clone)]
pub struct RealmOptions {
    /// The realm's name: the issuer is `{base}/realms/{realm}`. Letters, digits, `-`, `_` and `.` only.
    pub realm: String,
    pub clients: Vec<ClientSpec>,
    pub users: Vec<UserSpec>,
    /// Keycloak's "Access Token Lifespan" (default 5 minutes).
    pub access_token_lifetime: Duration,
    /// Keycloak's "SSO Session Idle": how long a refresh token stays usable (default 30 minutes).
    pub refresh_token_lifetime: Duration,
    /// A user name that `GET /auth` logs in at once, without a form: for tests driving a browser flow without a
    /// browser. `None`: the login form, as Keycloak.
    pub auto_approve: Option<String>,
}

impl RealmOptions {
    /// The demo realm: `demo`, users `alice`/`alice` and `bob`/`bob` (their `sub` from [`super::USERS`]); clients
    /// `tabhub-demo` (public: the password grant of `tabhub connect`), `tabhub` (confidential, secret
    /// `demo-secret`, any redirect URI) and `demo-publisher` (service account, secret `publisher-secret`); access
    /// tokens live 300 s, refresh tokens 1800 s.
    pub fn demo() -> Self {
        RealmOptions {
            realm: "demo".into(),
            clients: vec![
                ClientSpec::public(super::CLIENT_ID, &["*"]),
                ClientSpec::confidential("tabhub", "demo-secret", &["*"]),
                ClientSpec::service_account("demo-publisher", "publisher-secret"),
            ],
            users: super::USERS
                .iter()
                .map(|(name, sub)| UserSpec {
                    username: name.to_string(),
                    password: name.to_string(),
                    sub: sub.to_string(),
                    email: format!("{name}@demo.example"),
                    name: format!("{} Demo", capitalized(name)),
                })
                .collect(),
            access_token_lifetime: Duration::from_secs(300),
            refresh_token_lifetime: Duration::from_secs(1800),
            auto_approve: None,
        }
    }

    /// Why these options cannot make a realm, if they cannot.
    pub(super) fn check(&self) -> Result<(), String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(&self.realm) {
            return Err(format!(
                "realm name {:?}: letters, digits, - _ . only",
                self.realm
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for c in &self.clients {
            if c.id.is_empty() || !ids.insert(c.id.as_str()) {
                return Err(format!("client id {:?} empty or repeated", c.id));
            }
            if c.service_account && c.secret.is_none() {
                return Err(format!("service account client {:?} needs a secret", c.id));
            }
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.users {
            if u.username.is_empty() || !names.insert(u.username.as_str()) || u.sub.is_empty() {
                return Err(format!(
                    "user {:?}: empty or repeated name, or empty sub",
                    u.username
                ));
            }
        }
        if let Some(a) = &self.auto_approve {
            if !names.contains(a.as_str()) {
                return Err(format!("auto_approve names an unknown user {a:?}"));
            }
        }
        Ok(())
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
