//! The browser client, served by every tabhub: `/client/tabhub.js` (a dependency-free ES module) and
//! `/client/tabhub.d.ts` (its TypeScript declarations). Embedded at build time, so a deployment needs no files.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const CLIENT_JS: &str = include_str!("../client/tabhub.js");
const CLIENT_DTS: &str = include_str!("../client/tabhub.d.ts");

/// The client's routes.
pub fn router() -> Router {
    Router::new()
        .route(
            "/client/tabhub.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    CLIENT_JS,
                )
                    .into_response()
            }),
        )
        .route(
            "/client/tabhub.d.ts",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/typescript; charset=utf-8",
                    )],
                    CLIENT_DTS,
                )
                    .into_response()
            }),
        )
}
