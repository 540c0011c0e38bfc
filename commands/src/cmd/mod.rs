//! The built-in commands, one file each. To add one: write the file, declare it here and add its line to
//! [`register_builtin`].

pub mod authenticate;
pub mod init;
pub mod kg_activation;
pub mod ping;
pub mod session_status;
pub mod set_subscriptions;
pub mod subscribe;
pub mod unsubscribe;
pub mod visibility;

use crate::registry::Registry;

/// Registers every built-in command.
pub fn register_builtin(r: &mut Registry) {
    r.register(init::Init::default());
    r.register(ping::Ping);
    r.register(authenticate::Authenticate);
    r.register(subscribe::Subscribe);
    r.register(unsubscribe::Unsubscribe);
    r.register(set_subscriptions::SetSubscriptions);
    r.register(session_status::PullSessionStatus::default());
    r.register(session_status::PullSessionStatusV2::default());
    r.register(kg_activation::PullKgActivationStatus::default());
    r.register(visibility::Visibility);
}
