//! The operator console: a small single-page app over the operator API, served at `/console`.
//!
//! Its three files are compiled into the binary, so it works offline and needs no build step
//! and no Node at run time. The page itself is public, like the OpenAPI browser; everything it
//! shows comes from the operator endpoints, which ask for the operator token the page sends.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// Scripts and styles only from this origin, no inline code, no frames: the console shows
/// data customers typed (campaign titles, reasons) and must never run it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The console's routes: `/console` and its assets under `/console/`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/console",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/",
            get(|| async { Redirect::permanent("/console") }),
        )
        .route("/console/{asset}", get(asset))
}

async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    match name.as_str() {
        "console.js" => Ok(page(SCRIPT, "text/javascript; charset=utf-8")),
        "console.css" => Ok(page(STYLE, "text/css; charset=utf-8")),
        _ => Err(ApiError::NotFound {
            code: "route_not_found",
            what: "route",
        }),
    }
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary: ask again after a deploy, not every time.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}
