//! The registry: command name -> parameter check -> typed parameters -> handler.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::command::Command;
use crate::context::Context;
use crate::error::CommandError;
use crate::future::BoxFuture;

/// What `tabhub commands` prints for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandInfo {
    pub name: &'static str,
    pub doc: &'static str,
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
}

impl std::fmt::Display for CommandInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let params: Vec<String> = self
            .required
            .iter()
            .map(|p| (*p).to_owned())
            .chain(self.optional.iter().map(|p| format!("{p}?")))
            .collect();
        write!(f, "{} {{{}}}: {}", self.name, params.join(", "), self.doc)
    }
}

/// A command with its parameter type erased, so commands of different types share one map.
trait Erased: Send + Sync {
    fn info(&self) -> CommandInfo;
    fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String>;
    fn settings(&self) -> &'static [&'static str];
    fn call<'a>(
        &'a self,
        data: Map<String, Value>,
        ctx: &'a dyn Context,
    ) -> Result<BoxFuture<'a, Result<(), CommandError>>, CommandError>;
}

impl<C: Command> Erased for C {
    fn info(&self) -> CommandInfo {
        CommandInfo {
            name: C::NAME,
            doc: C::DOC,
            required: C::REQUIRED,
            optional: C::OPTIONAL,
        }
    }

    fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String> {
        Command::configure(self, settings)
    }

    fn settings(&self) -> &'static [&'static str] {
        C::SETTINGS
    }

    fn call<'a>(
        &'a self,
        data: Map<String, Value>,
        ctx: &'a dyn Context,
    ) -> Result<BoxFuture<'a, Result<(), CommandError>>, CommandError> {
        check_keys(&self.info(), &data)?;
        let params: C::Params = serde_json::from_value(Value::Object(data)).map_err(|e| {
            CommandError::BadParams(format!("invalid parameters for '{}': {e}", C::NAME))
        })?;
        Ok(Box::pin(self.handle(params, ctx)))
    }
}

/// Every required key present, no key outside required + optional (the Renku rule), with a message that lists
/// what the command accepts.
fn check_keys(info: &CommandInfo, data: &Map<String, Value>) -> Result<(), CommandError> {
    let missing: Vec<&str> = info
        .required
        .iter()
        .copied()
        .filter(|k| !data.contains_key(*k))
        .collect();
    let unexpected: Vec<&str> = data
        .keys()
        .map(String::as_str)
        .filter(|k| !info.required.contains(k) && !info.optional.contains(k))
        .collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing parameter(s) {}", quoted(&missing)));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected parameter(s) {}", quoted(&unexpected)));
    }
    Err(CommandError::BadParams(format!(
        "'{}': {}; it takes {}",
        info.name,
        problems.join(" and "),
        describe_params(info)
    )))
}

fn quoted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("'{}'", truncate(k, 64)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Peer-supplied keys are echoed in errors; keep them short.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn describe_params(info: &CommandInfo) -> String {
    let list = |keys: &[&str]| {
        if keys.is_empty() {
            "none".to_owned()
        } else {
            keys.join(", ")
        }
    };
    format!(
        "required: {}; optional: {}",
        list(info.required),
        list(info.optional)
    )
}

/// The commands a server accepts.
#[derive(Default)]
pub struct Registry {
    commands: BTreeMap<&'static str, Box<dyn Erased>>,
}

impl Registry {
    /// A registry with no command.
    pub fn empty() -> Self {
        Registry::default()
    }

    /// Adds a command; a command of the same name is replaced (so a deployment may override a built-in).
    pub fn register<C: Command>(&mut self, command: C) -> &mut Self {
        self.commands.insert(C::NAME, Box::new(command));
        self
    }

    /// Hands every command the `[commands]` table, once, at start. Fails naming the key when a value is wrong or
    /// when no command reads a key (a misspelt setting).
    pub fn configure(&mut self, settings: &Map<String, Value>) -> Result<(), String> {
        for key in settings.keys() {
            if !self
                .commands
                .values()
                .any(|c| c.settings().contains(&key.as_str()))
            {
                return Err(format!(
                    "commands.{key}: no command reads this setting (known: {})",
                    self.known_settings().join(", ")
                ));
            }
        }
        for c in self.commands.values_mut() {
            c.configure(settings)
                .map_err(|e| format!("[commands] {e}"))?;
        }
        Ok(())
    }

    fn known_settings(&self) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = self
            .commands
            .values()
            .flat_map(|c| c.settings().iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Whether a command of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Every command, sorted by name.
    pub fn describe(&self) -> Vec<CommandInfo> {
        self.commands.values().map(|c| c.info()).collect()
    }

    /// Checks `data` against the command's parameters and runs its handler.
    pub async fn dispatch(
        &self,
        name: &str,
        data: Map<String, Value>,
        ctx: &dyn Context,
    ) -> Result<(), CommandError> {
        let command = self.commands.get(name).ok_or_else(|| {
            CommandError::Unknown(format!(
                "Instruction of type '{}' is not supported.",
                truncate(name, 64)
            ))
        })?;
        command.call(data, ctx)?.await
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.commands.keys()).finish()
    }
}
