//! The fixture Renku gateway (`tabhub_fixtures::gateway`, the one `tabhub demo` serves) on a listener of its own.

use std::net::SocketAddr;

// Each test binary uses its own part of the support module.
#[allow(unused_imports)]
pub use tabhub_fixtures::gateway::{Endpoint, Gateway};

/// Starts a gateway on 127.0.0.1; returns it (to count calls and change answers) and its address.
pub async fn start() -> (Gateway, SocketAddr) {
    let gateway = Gateway::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = gateway.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (gateway, addr)
}
