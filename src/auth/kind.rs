//! Which signed JWTs are access tokens, and for which client: the one rule every entry point applies (the
//! handshake, the `authenticate` command, token custody and the publish API), after the signature and the time
//! claims were checked.
//!
//! Why a rule of its own: a realm signs ID, refresh and logout tokens with the same keys as access tokens, so a
//! valid signature says nothing about what a token is for. An ID token is handed to the browser (custody's
//! `logoutUrl` carries one as `id_token_hint`), and must never open a websocket. Providers mark access tokens in
//! one of two ways, and both are accepted by what they are:
//!
//! - Keycloak: a `typ` *claim* `Bearer` (its ID tokens say `ID`, its refresh tokens `Refresh` or `Offline`), the
//!   client in `azp`;
//! - RFC 9068 (JWT profile for access tokens, e.g. npm `oidc-provider`): a JOSE *header* `typ` `at+jwt`, the
//!   client in `client_id`.
//!
//! A token with neither marker is refused unless `auth.require_typ_bearer = false`, and even then only when it
//! cannot be an ID token (see [`accept`]). ID, refresh and logout tokens are refused whatever the settings.

use jsonwebtoken::Header;
use serde_json::Value;

/// The event claim of an OpenID Connect back-channel logout token.
const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// What a check accepts.
#[derive(Debug, Clone, Copy)]
pub struct Rule<'a> {
    /// The clients whose tokens are accepted: a token's `azp`, `client_id` or one of its `aud` must be one of them
    /// (`auth.client_ids` at the handshake, `publish.clients` at the publish API).
    pub clients: &'a [String],
    /// Also accept tokens with neither marker, when nothing in them says ID token (`!auth.require_typ_bearer`).
    pub allow_unmarked: bool,
}

/// How a token said it is an access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `typ` claim `Bearer`.
    Keycloak,
    /// `typ` header `at+jwt`.
    Rfc9068,
    /// Neither (accepted only with `allow_unmarked`).
    Unmarked,
}

/// An accepted access token: the client it was accepted for, and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub client: String,
    pub shape: Shape,
}

/// Why a signed token is not accepted as an access token. The messages go to clients: they never echo the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    IdToken,
    RefreshToken,
    LogoutToken,
    /// Another type (`typ` claim or header), or no marker while markers are required.
    NotAnAccessToken,
    /// An access token, of a client not accepted here.
    OtherClient,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::IdToken => "an ID token is not an access token",
            Refusal::RefreshToken => "a refresh token is not an access token",
            Refusal::LogoutToken => "a logout token is not an access token",
            Refusal::NotAnAccessToken => {
                "not an access token (neither a typ claim Bearer nor a typ header at+jwt)"
            }
            Refusal::OtherClient => "token issued for another client (azp, client_id or aud)",
        }
    }
}

/// A JOSE `typ` as a media type, lower case, without the optional `application/` prefix (RFC 7515, 4.1.9).
fn media_type(typ: &str) -> String {
    let t = typ.trim().to_ascii_lowercase();
    match t.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => t,
    }
}

/// The string values of a claim that is a string or an array of strings (`aud`).
fn strings(v: Option<&Value>) -> Vec<&str> {
    match v {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Decides whether a verified token (its header and claims) is an access token `rule` accepts, and for which
/// client:
///
/// 1. logout tokens (`typ` header `logout+jwt`, or the back-channel logout event), refresh tokens (`typ` claim
///    `Refresh` or `Offline`) and ID tokens (`typ` claim `ID`) are refused;
/// 2. a `typ` claim other than `Bearer`, or a `typ` header other than `JWT` or `at+jwt`, is another kind of token;
/// 3. a `nonce` marks an ID token, except in a Keycloak access token (`typ` claim `Bearer`: Keycloak before 24 copied
///    the login's nonce into the access token);
/// 4. a token with neither marker is refused unless `rule.allow_unmarked`; then an `aud` naming an accepted client
///    (or the token's own `azp`) marks an ID token, and the client must be named by `azp` or `client_id`;
/// 5. the client is the first of `azp`, `client_id`, then `aud` entries that `rule.clients` holds.
pub fn accept(header: &Header, claims: &Value, rule: &Rule<'_>) -> Result<Accepted, Refusal> {
    let header_typ = header.typ.as_deref().map(media_type);
    let at_jwt = match header_typ.as_deref() {
        None | Some("jwt") => false,
        Some("at+jwt") => true,
        Some("logout+jwt") => return Err(Refusal::LogoutToken),
        Some(_) => return Err(Refusal::NotAnAccessToken),
    };
    let logout_event = claims
        .get("events")
        .and_then(Value::as_object)
        .is_some_and(|e| e.contains_key(LOGOUT_EVENT));
    if logout_event {
        return Err(Refusal::LogoutToken);
    }
    let bearer = match claims.get("typ") {
        None => false,
        Some(Value::String(t)) => match t.to_ascii_lowercase().as_str() {
            "bearer" => true,
            "id" => return Err(Refusal::IdToken),
            "refresh" | "offline" => return Err(Refusal::RefreshToken),
            "logout" => return Err(Refusal::LogoutToken),
            _ => return Err(Refusal::NotAnAccessToken),
        },
        Some(_) => return Err(Refusal::NotAnAccessToken),
    };
    let shape = match (bearer, at_jwt) {
        (true, _) => Shape::Keycloak,
        (false, true) => Shape::Rfc9068,
        (false, false) => Shape::Unmarked,
    };
    if claims.get("nonce").is_some() && shape != Shape::Keycloak {
        return Err(Refusal::IdToken);
    }
    let azp = claims.get("azp").and_then(Value::as_str);
    let client_id = claims.get("client_id").and_then(Value::as_str);
    let aud = strings(claims.get("aud"));
    let accepted = |c: &&str| rule.clients.iter().any(|a| a == c);
    if shape == Shape::Unmarked {
        if !rule.allow_unmarked {
            return Err(Refusal::NotAnAccessToken);
        }
        // An ID token's `aud` always holds the client it was issued to.
        if aud.iter().any(|a| accepted(a) || Some(*a) == azp) {
            return Err(Refusal::IdToken);
        }
    }
    let named = azp.into_iter().chain(client_id);
    let client = match shape {
        Shape::Unmarked => named.into_iter().find(accepted),
        _ => named.chain(aud.iter().copied()).find(accepted),
    };
    client
        .map(|c| Accepted {
            client: c.to_owned(),
            shape,
        })
        .ok_or(Refusal::OtherClient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    fn header(typ: Option<&str>) -> Header {
        let mut h = Header::new(Algorithm::RS256);
        h.typ = typ.map(str::to_owned);
        h
    }

    fn clients() -> Vec<String> {
        vec!["renku-ui".into(), "tabhub".into()]
    }

    fn check(typ: Option<&str>, claims: Value, allow_unmarked: bool) -> Result<Accepted, Refusal> {
        let clients = clients();
        accept(
            &header(typ),
            &claims,
            &Rule {
                clients: &clients,
                allow_unmarked,
            },
        )
    }

    fn client(r: Result<Accepted, Refusal>) -> Result<String, Refusal> {
        r.map(|a| a.client)
    }

    #[test]
    fn keycloak_access_tokens_by_azp_or_aud() {
        let kc = json!({"typ": "Bearer", "azp": "renku-ui", "aud": "account"});
        assert_eq!(client(check(Some("JWT"), kc, false)), Ok("renku-ui".into()));
        let by_aud = json!({"typ": "Bearer", "azp": "cli", "aud": ["account", "tabhub"]});
        assert_eq!(client(check(None, by_aud, false)), Ok("tabhub".into()));
        let other = json!({"typ": "Bearer", "azp": "cli", "aud": "account"});
        assert_eq!(check(None, other, true), Err(Refusal::OtherClient));
        // Keycloak before 24 put the login's nonce in its access tokens.
        let nonce = json!({"typ": "Bearer", "azp": "tabhub", "nonce": "n"});
        assert!(check(None, nonce, false).is_ok());
    }

    #[test]
    fn rfc9068_access_tokens_by_client_id() {
        let at = json!({"client_id": "tabhub", "aud": "https://tabhub.example", "scope": "openid"});
        for typ in ["at+jwt", "application/at+jwt", "AT+JWT"] {
            let a = check(Some(typ), at.clone(), false).unwrap();
            assert_eq!((a.client.as_str(), a.shape), ("tabhub", Shape::Rfc9068));
        }
        let other = json!({"client_id": "cli", "aud": "https://tabhub.example"});
        assert_eq!(
            check(Some("at+jwt"), other, false),
            Err(Refusal::OtherClient)
        );
        let with_nonce = json!({"client_id": "tabhub", "nonce": "n"});
        assert_eq!(
            check(Some("at+jwt"), with_nonce, true),
            Err(Refusal::IdToken)
        );
    }

    #[test]
    fn id_refresh_and_logout_tokens_are_refused_whatever_the_settings() {
        for allow_unmarked in [false, true] {
            let kc_id = json!({"typ": "ID", "azp": "tabhub", "aud": "tabhub"});
            assert_eq!(
                check(Some("JWT"), kc_id, allow_unmarked),
                Err(Refusal::IdToken)
            );
            for typ in ["Refresh", "Offline"] {
                let r = json!({"typ": typ, "azp": "tabhub"});
                assert_eq!(check(None, r, allow_unmarked), Err(Refusal::RefreshToken));
            }
            let logout = json!({"aud": "tabhub", "events": {LOGOUT_EVENT: {}}});
            assert_eq!(
                check(Some("logout+jwt"), logout.clone(), allow_unmarked),
                Err(Refusal::LogoutToken)
            );
            assert_eq!(
                check(None, logout, allow_unmarked),
                Err(Refusal::LogoutToken)
            );
            // A standard ID token: no marker, the client in aud, often a nonce.
            let std_id = json!({"aud": "tabhub", "azp": "tabhub", "nonce": "n"});
            assert!(check(None, std_id, allow_unmarked).is_err());
            let std_id = json!({"aud": "renku-ui"});
            let refused = check(None, std_id, allow_unmarked);
            assert!(refused.is_err(), "{refused:?}");
            // Even marked at+jwt, a typ claim ID is an ID token.
            let mixed = json!({"typ": "ID", "client_id": "tabhub"});
            assert_eq!(
                check(Some("at+jwt"), mixed, allow_unmarked),
                Err(Refusal::IdToken)
            );
        }
    }

    #[test]
    fn unmarked_tokens_only_when_allowed_and_never_id_shaped() {
        let unmarked = json!({"azp": "renku-ui", "aud": "https://api.example"});
        assert_eq!(
            check(None, unmarked.clone(), false),
            Err(Refusal::NotAnAccessToken)
        );
        assert_eq!(client(check(None, unmarked, true)), Ok("renku-ui".into()));
        let by_client_id = json!({"client_id": "tabhub", "aud": ["https://api.example"]});
        assert!(check(Some("JWT"), by_client_id, true).is_ok());
        // Only azp/client_id name the client of an unmarked token: an aud naming it is an ID token.
        let aud_only = json!({"azp": "cli", "aud": "tabhub"});
        assert_eq!(check(None, aud_only, true), Err(Refusal::IdToken));
        let own_aud = json!({"azp": "cli", "aud": "cli"});
        assert_eq!(check(None, own_aud, true), Err(Refusal::IdToken));
    }

    #[test]
    fn other_types_are_not_access_tokens() {
        let claims = json!({"typ": "Bearer", "azp": "tabhub"});
        for typ in ["dpop+jwt", "secevent+jwt", "id_token+jwt", ""] {
            assert_eq!(
                check(Some(typ), claims.clone(), true),
                Err(Refusal::NotAnAccessToken),
                "{typ}"
            );
        }
        for typ in [json!("Serialized-ID"), json!(["Bearer"]), json!(1)] {
            let c = json!({"typ": typ, "azp": "tabhub"});
            assert_eq!(check(None, c, true), Err(Refusal::NotAnAccessToken));
        }
    }
}
