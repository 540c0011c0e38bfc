//! Wire profiles: what a tab may receive, chosen per tab at the handshake.
//!
//! - **tabhub**: the tab offered the `tabhub` subprotocol (the tabhub client does): the whole protocol, every kind
//!   of message and every close code.
//! - **Renku**: the tab offered no subprotocol, as Renku's own browser client (`renku-ui`) does. That client drops,
//!   and stores as an error, any frame whose `type` is not in its handler table or whose `data` holds a key outside
//!   the table's required + optional keys (`../shared/RENKU.md`, "The client, exactly"); and it reconnects only
//!   after 1006 (no close frame) or 4000. So a Renku tab receives only the frames of its table, cut to the allowed
//!   keys, and every close becomes one it recovers from: 4000 when a credential is missing (it reconnects and the
//!   gateway brings one), otherwise the connection drops without a close frame (1006: it reconnects after its own
//!   backoff, 10 s x 1.5^attempt, which is honest for a drain, an overload or an expired token alike).
//!
//! A frame is filtered once per Renku tab, at queue time: Renku tabs receive few frames (replies, loop results),
//! and tabhub tabs pay nothing.

use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::close_codes::{self, CloseCode};

/// The protocol a tab speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Tabhub,
    /// Renku's client; `older` admits the types of the client from before Renku removed its knowledge-graph pages
    /// (`activation`, `sessionStatus`, `test`).
    Renku {
        older: bool,
    },
}

/// Renku's handler table for scope `user`: type, required keys, optional keys.
const RENKU: &[(&str, &[&str], &[&str])] = &[
    ("init", &[], &["message"]),
    ("version", &["version"], &["start", "message"]),
    ("ack", &[], &["message"]),
    ("error", &[], &["message"]),
    ("sessionStatusV2", &[], &["message"]),
];

/// What the older client adds.
const RENKU_OLDER: &[(&str, &[&str], &[&str])] = &[
    ("activation", &[], &["message"]),
    ("sessionStatus", &[], &["message"]),
    ("test", &[], &["message"]),
];

/// How a tab's connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code.
    Frame(CloseCode),
    /// No close frame: the connection just drops (the peer sees 1006).
    Drop,
}

impl Profile {
    /// The frame as this tab may receive it: unchanged for tabhub tabs; for Renku tabs, `None` when its type is
    /// not in the table (or its scope is not `user`), else the frame with `data` cut to the table's keys (`None`
    /// when a required key is missing).
    pub fn admit(self, frame: &Utf8Bytes) -> Option<Utf8Bytes> {
        let Profile::Renku { older } = self else {
            return Some(frame.clone());
        };
        let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(frame.as_str()) else {
            return None;
        };
        if m.get("scope").and_then(Value::as_str) != Some("user") {
            return None;
        }
        let kind = m.get("type").and_then(Value::as_str)?.to_owned();
        let table = RENKU.iter().chain(if older { RENKU_OLDER } else { &[] });
        let (_, required, optional) = table.into_iter().find(|(k, _, _)| *k == kind)?;
        let Some(Value::Object(data)) = m.remove("data") else {
            return None;
        };
        let kept: Map<String, Value> = data
            .into_iter()
            .filter(|(k, _)| required.contains(&k.as_str()) || optional.contains(&k.as_str()))
            .collect();
        if !required.iter().all(|k| kept.contains_key(*k)) {
            return None;
        }
        m.insert("data".into(), Value::Object(kept));
        Some(Utf8Bytes::from(Value::Object(m).to_string()))
    }

    /// How a close with `code` ends this tab's connection.
    pub fn ending(self, code: CloseCode) -> Ending {
        match self {
            Profile::Tabhub => Ending::Frame(code),
            Profile::Renku { .. } if code == close_codes::MISSING_AUTH => Ending::Frame(code),
            Profile::Renku { .. } => Ending::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;
    use serde_json::json;

    fn admitted(p: Profile, kind: &str, data: Value) -> Option<Value> {
        p.admit(&protocol::encode(kind, &data, None))
            .map(|b| serde_json::from_str(b.as_str()).unwrap())
    }

    #[test]
    fn renku_tabs_get_only_their_table_cut_to_its_keys() {
        let renku = Profile::Renku { older: false };
        let init = admitted(
            renku,
            "init",
            json!({"message": "hi", "user": "a", "instance": "i"}),
        )
        .unwrap();
        assert_eq!(init["data"], json!({"message": "hi"}));
        assert_eq!(init["scope"], "user");
        let e = admitted(
            renku,
            "error",
            json!({"message": "no", "missingAuth": true}),
        )
        .unwrap();
        assert_eq!(e["data"], json!({"message": "no"}));
        assert!(admitted(renku, "authExpiring", json!({"expiresIn": 3})).is_none());
        assert!(admitted(renku, "recovered", json!({"function": "f"})).is_none());
        assert!(admitted(renku, "activation", json!({"message": "{}"})).is_none());
        assert!(
            admitted(renku, "version", json!({"message": "m"})).is_none(),
            "version is required"
        );
        let v = admitted(
            renku,
            "version",
            json!({"version": "1", "start": true, "message": "m", "x": 1}),
        )
        .unwrap();
        assert_eq!(
            v["data"],
            json!({"version": "1", "start": true, "message": "m"})
        );
        let topic = protocol::encode_scoped("topic", "event", &json!({"message": "x"}), None);
        assert!(renku.admit(&topic).is_none());
        let older = Profile::Renku { older: true };
        let a = admitted(
            older,
            "activation",
            json!({"message": "{\"1\":100}", "projects": {"1": 100}}),
        )
        .unwrap();
        assert_eq!(a["data"], json!({"message": "{\"1\":100}"}));
        let frame = protocol::encode("anything", &json!({"k": 1}), None);
        assert_eq!(Profile::Tabhub.admit(&frame), Some(frame));
    }

    #[test]
    fn renku_tabs_end_with_4000_or_a_drop() {
        let renku = Profile::Renku { older: false };
        assert_eq!(
            renku.ending(close_codes::MISSING_AUTH),
            Ending::Frame(close_codes::MISSING_AUTH)
        );
        for c in close_codes::ALL
            .iter()
            .filter(|c| **c != close_codes::MISSING_AUTH)
        {
            assert_eq!(renku.ending(*c), Ending::Drop, "{}", c.code);
        }
        assert_eq!(
            Profile::Tabhub.ending(close_codes::SERVICE_RESTART),
            Ending::Frame(close_codes::SERVICE_RESTART)
        );
    }
}
