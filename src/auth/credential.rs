//! Where a handshake's credential comes from, in order: `Authorization: Bearer`, the configured token cookie, then
//! the websocket subprotocol.
//!
//! Browsers cannot set headers on a websocket, so they offer two subprotocols:
//! `new WebSocket(url, ["tabhub", "tabhub.bearer." + accessToken])`. The server echoes `tabhub` (never the token).

use axum::http::HeaderMap;

/// The subprotocol the server echoes.
pub const SUBPROTOCOL: &str = "tabhub";
/// Prefix of the subprotocol that carries the token.
pub const BEARER_PREFIX: &str = "tabhub.bearer.";

/// Where the credential was found; cookie credentials make the Origin check mandatory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    /// The cookie holding an access token (`auth.token_cookie`).
    Cookie,
    /// Token custody's login cookie: the value is a login id, not a token.
    Login,
    Subprotocol,
}

/// The token of an `Authorization: Bearer` header (the scheme is case-insensitive, RFC 7235), if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Finds the credential of a handshake: an access token, or (with [`Source::Login`]) a custody login id.
pub fn extract(
    headers: &HeaderMap,
    token_cookie: &str,
    session_cookie: &str,
) -> Option<(String, Source)> {
    if let Some(token) = bearer(headers) {
        return Some((token.to_owned(), Source::Header));
    }
    if !token_cookie.is_empty() {
        if let Some(t) = cookie(headers, token_cookie) {
            return Some((t, Source::Cookie));
        }
    }
    if !session_cookie.is_empty() {
        if let Some(login_id) = cookie(headers, session_cookie) {
            return Some((login_id, Source::Login));
        }
    }
    subprotocols(headers)
        .find_map(|p| p.strip_prefix(BEARER_PREFIX).map(str::to_owned))
        .filter(|t| !t.is_empty())
        .map(|t| (t, Source::Subprotocol))
}

/// The value of cookie `name`, from every `Cookie` header.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// The offered subprotocols.
pub fn subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn order_and_forms() {
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("tabhub, tabhub.bearer.abc"),
        );
        assert_eq!(
            extract(&h, "", ""),
            Some(("abc".into(), Source::Subprotocol))
        );
        h.insert(
            "cookie",
            HeaderValue::from_static("x=1; sess=s1; at=cookietok"),
        );
        assert_eq!(extract(&h, "", "sess"), Some(("s1".into(), Source::Login)));
        assert_eq!(
            extract(&h, "at", "sess"),
            Some(("cookietok".into(), Source::Cookie))
        );
        assert_eq!(
            extract(&h, "", ""),
            Some(("abc".into(), Source::Subprotocol))
        );
        h.insert("authorization", HeaderValue::from_static("Bearer hdr"));
        assert_eq!(
            extract(&h, "at", "sess"),
            Some(("hdr".into(), Source::Header))
        );
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Basic xyz"));
        assert_eq!(extract(&h, "", ""), None);
    }

    proptest! {
        /// Any header bytes a peer can send give a credential or none, never a panic.
        #[test]
        fn any_headers_decode(
            auth in proptest::collection::vec(any::<u8>(), 0..80),
            cookie in proptest::collection::vec(any::<u8>(), 0..120),
            proto in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut h = HeaderMap::new();
            for (name, bytes) in [("authorization", auth), ("cookie", cookie), ("sec-websocket-protocol", proto)] {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    h.insert(name, v);
                }
            }
            let _ = extract(&h, "at", "sess");
            let _ = subprotocols(&h).count();
        }
    }
}
