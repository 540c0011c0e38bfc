//! The built-in commands, one file each. To add one: write the file, declare it here and add its line to
//! [`register_builtin`].

pub mod authenticate;
pub mod init;
pub mod ping;

use crate::registry::Registry;

/// Registers every built-in command.
pub fn register_builtin(r: &mut Registry) {
    r.register(init::Init);
    r.register(ping::Ping);
    r.register(authenticate::Authenticate);
}
