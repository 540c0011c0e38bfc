//! HTTP routes besides the websocket: the publish API, the GitLab webhook receiver and token custody's login routes. With the handshake and the
//! connection, the HTTP layer: the only modules that see the [`App`](crate::app::App).

pub mod custody;
pub mod hooks;
pub mod publish;
