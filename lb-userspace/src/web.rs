//! The status page served on the metrics address (`agent.metrics`) at `/`: a static page whose
//! script polls the read-only `GET /v1/status` there and shows listeners with their rates,
//! target groups with each target's state, the drop counters and the interfaces' XDP modes.
//!
//! The files are in `web/` and embedded in the binary (the agent runs on closed networks: no
//! CDN, no build step). Every answer forbids caching stale copies across upgrades
//! (`Cache-Control: no-cache`) and anything but the page's own files (`Content-Security-Policy:
//! default-src 'self'`: no inline script or style, no other origin).

use axum::{
    http::{header, HeaderName, HeaderValue, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

/// One embedded file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// The served paths and their files; `/` is the page.
const ASSETS: &[(&str, Asset)] = &[
    (
        "/",
        Asset {
            content_type: "text/html; charset=utf-8",
            body: include_bytes!("web/index.html"),
        },
    ),
    (
        "/app.js",
        Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("web/app.js"),
        },
    ),
    (
        "/style.css",
        Asset {
            content_type: "text/css; charset=utf-8",
            body: include_bytes!("web/style.css"),
        },
    ),
    (
        "/favicon.svg",
        Asset {
            content_type: "image/svg+xml",
            body: include_bytes!("web/favicon.svg"),
        },
    ),
];

/// The policy of every answer: the page's own files and API only; no inline code, no frames,
/// no forms, no `<base>`.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The file served at `path`, if any (`/index.html` is `/`).
pub fn asset(path: &str) -> Option<Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// The paths served (`/index.html` aside).
pub fn paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(p, _)| *p)
}

/// `GET` (and `HEAD`) of every asset, for the metrics listener's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    paths()
        .chain(["/index.html"])
        .fold(Router::new(), |r, p| r.route(p, get(serve)))
}

async fn serve(uri: Uri) -> Response {
    let asset = asset(uri.path()).expect("routed only for the assets' paths");
    let headers: [(HeaderName, HeaderValue); 5] = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the page links is served, and nothing the page needs comes from elsewhere.
    #[test]
    fn the_page_links_only_its_own_files() {
        let page = std::str::from_utf8(asset("/").unwrap().body).unwrap();
        for linked in ["style.css", "app.js", "favicon.svg"] {
            assert!(page.contains(&format!("\"{linked}\"")), "{linked}");
            assert!(
                asset(&format!("/{linked}")).is_some(),
                "{linked} not served"
            );
        }
        for asset in paths().filter_map(asset) {
            let text = String::from_utf8_lossy(asset.body);
            assert!(
                !text.contains("http://") && !text.contains("https://")
                    || asset.content_type.starts_with("image/"),
                "an asset names another origin"
            );
        }
        assert!(asset("/nope.js").is_none());
    }

    /// The script puts data into the page as text only.
    #[test]
    fn the_script_never_writes_markup() {
        let script = std::str::from_utf8(asset("/app.js").unwrap().body).unwrap();
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script.contains(sink), "app.js uses {sink}");
        }
    }
}
