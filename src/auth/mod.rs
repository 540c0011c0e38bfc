//! Authentication against a Keycloak realm: discovery and keys ([`realm`]), access-token verification
//! ([`verify`]), and where a handshake's credential comes from ([`credential`]).

pub mod credential;
pub mod crypto;
pub mod realm;
pub mod verified;
pub mod verify;

pub use realm::{Discovery, Realm};
pub use verified::{AuthError, Verified};
