//! A browser, as far as cookies go: one cookie jar, redirects followed by hand. It sends a cookie to the paths its
//! `Path` covers and forgets it on `Max-Age=0`, as browsers do; it ignores domains (everything is 127.0.0.1) and a
//! positive `Max-Age` (a hostile client keeps what it likes; tests of expiry rely on the server's own check).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

pub struct Browser {
    pub http: reqwest::Client,
    /// name -> (path, value)
    jar: Mutex<BTreeMap<String, (String, String)>>,
}

impl Default for Browser {
    fn default() -> Self {
        Browser::new(None)
    }
}

impl Browser {
    /// A browser with an empty jar; `from` binds its connections to that local address (127.0.0.x: another client
    /// address for the server's per-address limits).
    pub fn new(from: Option<IpAddr>) -> Browser {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(from)
            .build()
            .unwrap();
        Browser {
            http,
            jar: Mutex::new(BTreeMap::new()),
        }
    }

    /// `GET url` with the jar's cookies for its path; keeps the answer's cookies.
    pub async fn get(&self, url: &str) -> reqwest::Response {
        let path = reqwest::Url::parse(url).unwrap().path().to_owned();
        let mut req = self.http.get(url);
        if let Some(cookies) = self.cookie_header(&path) {
            req = req.header("cookie", cookies);
        }
        let r = req.send().await.unwrap();
        self.keep(&r);
        r
    }

    /// `POST url` with a form body and the jar's cookies for its path; keeps the answer's cookies.
    pub async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let path = reqwest::Url::parse(url).unwrap().path().to_owned();
        let mut req = self.http.post(url).form(form);
        if let Some(cookies) = self.cookie_header(&path) {
            req = req.header("cookie", cookies);
        }
        let r = req.send().await.unwrap();
        self.keep(&r);
        r
    }

    /// The `Cookie` header the jar sends to `path`, if any.
    pub fn cookie_header(&self, path: &str) -> Option<String> {
        let jar = self.jar.lock().unwrap();
        let v: Vec<String> = jar
            .iter()
            .filter(|(_, (p, _))| {
                path == p || path.starts_with(&format!("{}/", p.trim_end_matches('/'))) || p == "/"
            })
            .map(|(n, (_, v))| format!("{n}={v}"))
            .collect();
        (!v.is_empty()).then(|| v.join("; "))
    }

    /// The value of cookie `name` in the jar.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.jar.lock().unwrap().get(name).map(|(_, v)| v.clone())
    }

    /// Puts (or replaces) a cookie, as a hostile client can.
    pub fn set_cookie(&self, name: &str, path: &str, value: &str) {
        self.jar
            .lock()
            .unwrap()
            .insert(name.into(), (path.into(), value.into()));
    }

    fn keep(&self, r: &reqwest::Response) {
        let mut jar = self.jar.lock().unwrap();
        for h in r.headers().get_all("set-cookie") {
            let h = h.to_str().unwrap();
            let mut parts = h.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            let mut path = "/".to_owned();
            let mut gone = value.is_empty();
            for attr in parts {
                let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
                if k.eq_ignore_ascii_case("path") {
                    path = v.to_owned();
                } else if k.eq_ignore_ascii_case("max-age") && v == "0" {
                    gone = true;
                }
            }
            if gone {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), (path, value.to_owned()));
            }
        }
    }
}

/// The `Location` of a redirect.
pub fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_owned()
}

/// The `Set-Cookie` headers of an answer that set (not clear) cookie `name`.
pub fn sets_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|h| h.to_str().ok())
        .find(|h| h.starts_with(&format!("{name}=")) && !h.contains("Max-Age=0"))
        .map(str::to_owned)
}
