//! Authentication against a Keycloak realm (or any OpenID provider): discovery and keys ([`realm`]), signature
//! verification ([`verify`]), which tokens are access tokens for which client ([`kind`]), and where a handshake's
//! credential comes from ([`credential`]).

pub mod credential;
pub mod crypto;
pub mod kind;
pub mod realm;
pub mod verified;
pub mod verify;

pub use realm::{Discovery, Realm};
pub use verified::{AuthError, Verified};
