//! The `TABHUB_*` environment overlay: each variable names one configuration key and overrides the file's value.
//!
//! A leaf key's variable is `TABHUB_` + its dotted path in upper case with `_` for `.`
//! (`session.linger_ms` -> `TABHUB_SESSION_LINGER_MS`); its type is the default value's (integer, boolean, list,
//! string). Free-form tables ([`FREE_TABLES`]) take any key below them. Any other `TABHUB_*` variable is refused
//! ("no such configuration key"), so that a misspelt key fails the start instead of being ignored.
//!
//! The one exception is [`CLIENT_ENV_PREFIX`]: `TABHUB_CONNECT_*` belongs to the `tabhub connect` client, not to
//! the server, and the overlay skips it. The client's token variable ([`CONNECT_TOKEN_ENV`]) used to be
//! `TABHUB_TOKEN`, which `serve` then refused as an unknown key: a shell set up for the client could not start the
//! server. No configuration key may live under the reserved prefix (a test checks it).

use super::error::ConfigError;

/// Environment variables under this prefix are the `tabhub connect` client's, never configuration.
pub const CLIENT_ENV_PREFIX: &str = "TABHUB_CONNECT_";

/// The access token `tabhub connect` sends (under [`CLIENT_ENV_PREFIX`], so `serve` ignores it).
pub const CONNECT_TOKEN_ENV: &str = "TABHUB_CONNECT_TOKEN";

/// Tables whose keys are free-form (any key may be set from the environment).
pub(super) const FREE_TABLES: &[&str] = &["backends", "commands"];

/// Overlays `TABHUB_*` variables on `value`, typed by the leaves of `defaults` (the default configuration, passed
/// in so that this module does not depend on the root it serves).
pub(super) fn apply_env(
    value: &mut toml::Value,
    defaults: &toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut leaves = Vec::new();
    collect_leaves(defaults, &mut Vec::new(), &mut leaves);
    for (var, raw) in env {
        if var.starts_with(CLIENT_ENV_PREFIX) {
            continue;
        }
        let Some(rest) = var.strip_prefix("TABHUB_") else {
            continue;
        };
        let target = leaves
            .iter()
            .find(|(path, _)| env_name(path) == rest)
            .map(|(path, default)| (path.clone(), Some(*default)))
            .or_else(|| {
                FREE_TABLES.iter().find_map(|t| {
                    let prefix = format!("{}_", t.to_uppercase());
                    rest.strip_prefix(&prefix)
                        .filter(|k| !k.is_empty())
                        .map(|k| (vec![t.to_string(), k.to_lowercase()], None))
                })
            });
        let Some((path, default)) = target else {
            return Err(ConfigError::Env {
                var: var.clone(),
                key: rest.to_lowercase(),
                message: "no such configuration key".into(),
            });
        };
        let parsed = parse_env_value(&raw, default).map_err(|message| ConfigError::Env {
            var: var.clone(),
            key: path.join("."),
            message,
        })?;
        set_path(value, &path, parsed);
    }
    Ok(())
}

fn env_name(path: &[String]) -> String {
    path.join("_").to_uppercase()
}

fn collect_leaves<'a>(
    v: &'a toml::Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a toml::Value)>,
) {
    match v {
        toml::Value::Table(t) if !FREE_TABLES.contains(&path.join(".").as_str()) => {
            for (k, child) in t {
                path.push(k.clone());
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        toml::Value::Table(_) => {}
        leaf => out.push((path.clone(), leaf)),
    }
}

fn parse_env_value(raw: &str, default: Option<&toml::Value>) -> Result<toml::Value, String> {
    use toml::Value as V;
    Ok(match default {
        Some(V::Integer(_)) => V::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {raw:?}"))?,
        ),
        Some(V::Boolean(_)) => V::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {raw:?}")),
        }),
        Some(V::Array(_)) if raw.trim_start().starts_with('[') => {
            let t: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|e| format!("not a TOML array: {}", e.message()))?;
            t.get("v").cloned().unwrap_or(V::Array(vec![]))
        }
        Some(V::Array(_)) => V::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| V::String(s.to_owned()))
                .collect(),
        ),
        _ => V::String(raw.to_owned()),
    })
}

fn set_path(root: &mut toml::Value, path: &[String], leaf: toml::Value) {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        let toml::Value::Table(t) = cur else { return };
        if i + 1 == path.len() {
            t.insert(key.clone(), leaf);
            return;
        }
        cur = t
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn minimal() -> Vec<(String, String)> {
        vec![
            (
                "TABHUB_AUTH_ISSUER".into(),
                "https://kc.example/realms/renku".into(),
            ),
            ("TABHUB_AUTH_CLIENT_IDS".into(), "renku-ui".into()),
        ]
    }

    #[test]
    fn the_connect_clients_variable_is_not_configuration_but_unknown_keys_still_fail() {
        assert!(CONNECT_TOKEN_ENV.starts_with(CLIENT_ENV_PREFIX));
        let mut env = minimal();
        env.push((CONNECT_TOKEN_ENV.into(), "eyJhbGciOi.not.checked".into()));
        Config::load(None, env).expect("serve starts with the client's token set");

        let mut env = minimal();
        env.push((CONNECT_TOKEN_ENV.into(), "eyJhbGciOi.not.checked".into()));
        env.push(("TABHUB_SESSION_LINGERING_MS".into(), "5".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(
            e.contains("TABHUB_SESSION_LINGERING_MS")
                && e.contains("session_lingering_ms")
                && e.contains("no such configuration key"),
            "{e}"
        );

        // The client's former variable is not configuration either: still refused, naming it.
        let mut env = minimal();
        env.push(("TABHUB_TOKEN".into(), "x".into()));
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("TABHUB_TOKEN"), "{e}");
    }

    #[test]
    fn no_configuration_key_lives_under_the_clients_prefix() {
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut leaves = Vec::new();
        collect_leaves(&defaults, &mut Vec::new(), &mut leaves);
        let reserved = CLIENT_ENV_PREFIX.trim_start_matches("TABHUB_");
        for (path, _) in &leaves {
            let var = format!("{}_", env_name(path));
            assert!(!var.starts_with(reserved), "{} is hidden", path.join("."));
        }
        for t in FREE_TABLES {
            let table = format!("{}_", t.to_uppercase());
            assert!(!table.starts_with(reserved), "{t}");
        }
    }
}
