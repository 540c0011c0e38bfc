//! Typed reads of the `[commands]` settings table, which commands receive as JSON.
//!
//! Values may come from the TOML file (numbers, arrays) or from `TABHUB_COMMANDS_*` environment variables, which
//! arrive as strings; each reader accepts both forms, so `kg_stale_after_ms = 5000` and
//! `TABHUB_COMMANDS_KG_STALE_AFTER_MS=5000` mean the same. A value of the wrong type is an error naming the key,
//! never a silent fallback to the default.

use serde_json::{Map, Value};

/// A string setting, or `default` when absent.
pub fn string(settings: &Map<String, Value>, key: &str, default: &str) -> Result<String, String> {
    match settings.get(key) {
        None => Ok(default.to_owned()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("setting '{key}' must be a string, got {other}")),
    }
}

/// A non-negative integer setting (a number or a numeric string), or `default` when absent.
pub fn u64(settings: &Map<String, Value>, key: &str, default: u64) -> Result<u64, String> {
    let bad = |v: &Value| format!("setting '{key}' must be a non-negative integer, got {v}");
    match settings.get(key) {
        None => Ok(default),
        Some(v @ Value::Number(n)) => n.as_u64().ok_or_else(|| bad(v)),
        Some(v @ Value::String(s)) => s.trim().parse().map_err(|_| bad(v)),
        Some(v) => Err(bad(v)),
    }
}

/// A list of strings (an array, or a comma-separated string), or `default` when absent.
pub fn string_list(
    settings: &Map<String, Value>,
    key: &str,
    default: &[&str],
) -> Result<Vec<String>, String> {
    match settings.get(key) {
        None => Ok(default.iter().map(|s| (*s).to_owned()).collect()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "setting '{key}' must be a list of strings, got an item {other}"
                )),
            })
            .collect(),
        Some(other) => Err(format!(
            "setting '{key}' must be a list of strings, got {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn reads_toml_and_environment_forms() {
        let s = map(json!({"a": 5, "b": "7", "c": ["x", "y"], "d": "x, y,", "e": -1, "f": [1]}));
        assert_eq!(u64(&s, "a", 1), Ok(5));
        assert_eq!(u64(&s, "b", 1), Ok(7));
        assert_eq!(u64(&s, "zz", 1), Ok(1));
        assert!(u64(&s, "e", 1).unwrap_err().contains("'e'"));
        assert_eq!(string_list(&s, "c", &[]).unwrap(), ["x", "y"]);
        assert_eq!(string_list(&s, "d", &[]).unwrap(), ["x", "y"]);
        assert_eq!(string_list(&s, "zz", &["q"]).unwrap(), ["q"]);
        assert!(string_list(&s, "f", &[]).is_err());
        assert_eq!(string(&s, "zz", "gateway").unwrap(), "gateway");
        assert!(string(&s, "a", "").is_err());
    }
}
