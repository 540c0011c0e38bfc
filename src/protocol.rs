//! The wire protocol: Renku's envelope, unchanged.
//!
//! - client -> server: `{"timestamp": ISO-8601, "type": "<command>", "data": {...}, "id"?: ...}`;
//! - server -> client: `{"timestamp": ISO-8601, "scope": "user", "type": "<kind>", "data": {...}, "id"?: ...}`.
//!
//! `timestamp` and `data` may be omitted by the client (`data` then is `{}`); `id` (a string or a number) is echoed
//! in the reply. A plain string payload travels as `{"message": "..."}`. Decoding never panics and every failure
//! says what is wrong.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A decoded client message.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub kind: String,
    pub data: Map<String, Value>,
    pub id: Option<Value>,
}

/// Why a frame is not a command; `id` is kept when it could be read, so the error can still be matched.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub message: String,
    pub id: Option<Value>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
    // Accepted and ignored: Renku's client sends it.
    #[serde(default, rename = "timestamp")]
    _timestamp: Option<Value>,
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<Request, DecodeError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DecodeError {
        message: format!("malformed JSON: {e}"),
        id: None,
    })?;
    if !value.is_object() {
        return Err(DecodeError {
            message: "a message must be a JSON object {\"type\": ..., \"data\": {...}}".into(),
            id: None,
        });
    }
    let env: Envelope = serde_json::from_value(value).map_err(|e| DecodeError {
        message: format!("malformed message: {e}"),
        id: None,
    })?;
    let id = match env.id {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(v),
        Some(_) => {
            return Err(DecodeError {
                message: "'id' must be a string or a number".into(),
                id: None,
            })
        }
    };
    let fail = |message: &str| DecodeError {
        message: message.to_owned(),
        id: id.clone(),
    };
    let kind = match env.kind {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(_) => return Err(fail("'type' must be a non-empty string")),
        None => return Err(fail("missing 'type': every message names its command")),
    };
    let data = match env.data {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(fail("'data' must be a JSON object")),
    };
    Ok(Request { kind, data, id })
}

/// Encodes a server message once; the bytes are shared by every tab it goes to.
pub fn encode(kind: &str, data: &Value, id: Option<&Value>) -> Utf8Bytes {
    encode_scoped("user", kind, data, id)
}

/// Encodes a server message with another scope (`topic`, `broadcast`).
pub fn encode_scoped(scope: &str, kind: &str, data: &Value, id: Option<&Value>) -> Utf8Bytes {
    let mut m = Map::with_capacity(5);
    m.insert(
        "timestamp".into(),
        Value::String(timestamp(SystemTime::now())),
    );
    m.insert("scope".into(), Value::String(scope.into()));
    m.insert("type".into(), Value::String(kind.into()));
    let data = match data {
        Value::String(s) => {
            let mut o = Map::new();
            o.insert("message".into(), Value::String(s.clone()));
            Value::Object(o)
        }
        other => other.clone(),
    };
    m.insert("data".into(), data);
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    Utf8Bytes::from(Value::Object(m).to_string())
}

/// Encodes a published message: `{timestamp, scope, type, data, eventId}` plus `topic` for topic messages.
pub fn encode_published(
    scope: &str,
    kind: &str,
    data: &Value,
    event_id: &str,
    topic: Option<&str>,
) -> Utf8Bytes {
    let mut m = Map::with_capacity(6);
    m.insert(
        "timestamp".into(),
        Value::String(timestamp(SystemTime::now())),
    );
    m.insert("scope".into(), Value::String(scope.into()));
    if let Some(t) = topic {
        m.insert("topic".into(), Value::String(t.into()));
    }
    m.insert("type".into(), Value::String(kind.into()));
    m.insert("data".into(), data.clone());
    m.insert("eventId".into(), Value::String(event_id.into()));
    Utf8Bytes::from(Value::Object(m).to_string())
}

/// ISO-8601 UTC with milliseconds, e.g. `2026-11-23T19:14:05.123Z`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, da) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's civil calendar algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn renku_envelope() {
        let r = decode(r#"{"timestamp":"2024-01-01T00:00:00Z","type":"ping","data":{}}"#).unwrap();
        assert_eq!(r.kind, "ping");
        assert!(r.data.is_empty() && r.id.is_none());
        let r = decode(r#"{"type":"init","data":{"requestServerVersion":true},"id":7}"#).unwrap();
        assert_eq!(r.id, Some(Value::from(7)));
    }

    #[test]
    fn errors_say_what_is_wrong_and_keep_the_id() {
        assert!(decode("{oops")
            .unwrap_err()
            .message
            .starts_with("malformed JSON"));
        assert!(decode("[1]").unwrap_err().message.contains("JSON object"));
        let e = decode(r#"{"data":{},"id":"a"}"#).unwrap_err();
        assert!(e.message.contains("missing 'type'"));
        assert_eq!(e.id, Some(Value::from("a")));
        assert!(decode(r#"{"type":"x","data":[1]}"#)
            .unwrap_err()
            .message
            .contains("'data'"));
        assert!(decode(r#"{"type":3}"#)
            .unwrap_err()
            .message
            .contains("'type'"));
        assert!(decode(r#"{"type":"x","id":{}}"#)
            .unwrap_err()
            .message
            .contains("'id'"));
    }

    #[test]
    fn encodes_string_payload_as_message() {
        let b = encode("init", &Value::from("Connection established."), None);
        let v: Value = serde_json::from_str(b.as_str()).unwrap();
        assert_eq!(v["data"]["message"], "Connection established.");
        assert_eq!(v["scope"], "user");
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(timestamp(t), "2026-11-18T11:06:40.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    proptest! {
        #[test]
        fn any_text_decodes_or_errors(s in ".{0,200}") {
            let _ = decode(&s);
        }

        #[test]
        fn any_json_shape_decodes_or_errors(kind in proptest::option::of(".{0,20}"), id in any::<Option<i64>>(), extra in ".{0,20}") {
            let mut m = Map::new();
            if let Some(k) = kind { m.insert("type".into(), Value::String(k)); }
            if let Some(i) = id { m.insert("id".into(), Value::from(i)); }
            m.insert("data".into(), Value::String(extra));
            let _ = decode(&Value::Object(m).to_string());
        }
    }
}
