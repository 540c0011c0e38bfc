//! The error a handler returns.

/// Why a message was not carried out. The text is sent to the tab that sent it, so it must never contain a token
/// or a session id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// No command of that name (Renku's wording).
    Unknown(String),
    /// A required key is missing, or a key outside required + optional is present, or a value has the wrong type.
    BadParams(String),
    /// The handler refused or failed; the message explains why.
    Failed(String),
}

impl CommandError {
    pub fn failed(message: impl Into<String>) -> Self {
        CommandError::Failed(message.into())
    }

    /// The message sent to the tab.
    pub fn message(&self) -> &str {
        match self {
            CommandError::Unknown(m) | CommandError::BadParams(m) | CommandError::Failed(m) => m,
        }
    }

    /// A short label for metrics: `unknown`, `bad_params` or `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            CommandError::Unknown(_) => "unknown",
            CommandError::BadParams(_) => "bad_params",
            CommandError::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for CommandError {}
