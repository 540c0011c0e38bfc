//! The close codes tabhub sends, and what a client should do on each. The README publishes this table.

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// Reconnect soon (after a short random delay).
    Reconnect,
    /// Reconnect with exponential backoff and jitter.
    Backoff,
    /// Obtain a fresh credential, then reconnect.
    Reauthenticate,
    /// Do not reconnect.
    Stop,
}

/// A close code and its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode {
    pub code: u16,
    pub name: &'static str,
    pub advice: Advice,
}

macro_rules! codes {
    ($($ident:ident = $code:expr, $name:expr, $advice:ident;)*) => {
        $(pub const $ident: CloseCode = CloseCode { code: $code, name: $name, advice: Advice::$advice };)*
        /// Every code, for the README and for tests.
        pub const ALL: &[CloseCode] = &[$($ident),*];
    };
}

codes! {
    NORMAL = 1000, "normal closure", Reconnect;
    PROTOCOL_ERROR = 1002, "websocket protocol violation", Backoff;
    INVALID_PAYLOAD = 1007, "text frame that is not UTF-8", Backoff;
    MESSAGE_TOO_BIG = 1009, "message too big", Backoff;
    INTERNAL_ERROR = 1011, "internal error", Backoff;
    SERVICE_RESTART = 1012, "server restarting or draining", Reconnect;
    TRY_AGAIN_LATER = 1013, "overloaded or not ready", Backoff;
    MISSING_AUTH = 4000, "no credential (Renku's code)", Reauthenticate;
    INVALID_TOKEN = 4001, "invalid token", Stop;
    TOKEN_EXPIRED = 4002, "token expired and not renewed", Reauthenticate;
    LOGGED_OUT = 4003, "logged out", Stop;
    RATE_LIMITED = 4008, "too many commands", Backoff;
    SLOW_CONSUMER = 4009, "outbound queue full (tab not reading)", Backoff;
    TOO_MANY_TABS = 4029, "too many tabs for this user", Backoff;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        assert!(ALL.iter().all(|c| seen.insert(c.code)));
    }
}
