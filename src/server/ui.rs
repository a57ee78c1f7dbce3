//! The operator page, `GET /ui/`: plain HTML, CSS and JavaScript embedded
//! in the binary, no build step. The page uses opsd's own REST surface (the
//! console API's operation infos, cancel, delete, polling reports, the
//! server-sent-events feed), so it shows what any client would see.
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles and
//! connections from this origin only; no inline code, no frames), `nosniff`
//! and no referrer. The page references its assets with their content hash
//! (`app.js?v=…`), so the assets may be cached for good while the page itself
//! is revalidated (`no-cache` with an ETag) and a new binary's page never
//! mixes with an old script.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// What every answer of the page carries.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// One embedded file, as served.
struct Asset {
    body: Bytes,
    content_type: &'static str,
    etag: HeaderValue,
    /// Assets named by their hash are immutable; the page is revalidated.
    immutable: bool,
}

impl Asset {
    fn new(body: Bytes, content_type: &'static str, immutable: bool) -> Self {
        let hash = hash(&body);
        let etag =
            HeaderValue::from_str(&format!("\"{}\"", &hash[..16])).expect("hex is a valid header");
        Self {
            body,
            content_type,
            etag,
            immutable,
        }
    }
}

struct Assets {
    index: Asset,
    script: Asset,
    style: Asset,
}

fn hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The assets, built once: the page names the assets' combined hash.
fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let version = hash(format!("{SCRIPT}\0{STYLE}").as_bytes());
        let index = INDEX.replace("{{version}}", &version[..16]);
        Assets {
            index: Asset::new(Bytes::from(index), "text/html; charset=utf-8", false),
            script: Asset::new(
                Bytes::from_static(SCRIPT.as_bytes()),
                "text/javascript; charset=utf-8",
                true,
            ),
            style: Asset::new(
                Bytes::from_static(STYLE.as_bytes()),
                "text/css; charset=utf-8",
                true,
            ),
        }
    })
}

/// Whether `path` is the page's (`/ui` and below).
pub(super) fn is_ui_path(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// Answers a request under `/ui`.
pub(super) fn answer(method: &Method, path: &str, headers: &HeaderMap) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "The page answers GET only.\n",
        );
    }
    let assets = assets();
    let asset = match path {
        "/ui" => {
            let mut response = plain(StatusCode::PERMANENT_REDIRECT, "");
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
            return response;
        }
        "/ui/" | "/ui/index.html" => &assets.index,
        "/ui/app.js" => &assets.script,
        "/ui/app.css" => &assets.style,
        _ => return plain(StatusCode::NOT_FOUND, "No such file of the page.\n"),
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|tags| tags.as_bytes() == asset.etag.as_bytes());
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if method == Method::HEAD {
        (StatusCode::OK, Bytes::new())
    } else {
        (StatusCode::OK, asset.body.clone())
    };
    let mut response = secured(Response::new(Full::new(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::ETAG, asset.etag.clone());
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    response
}

/// A plain-text answer of the page.
fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = secured(Response::new(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn secured(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Response<Full<Bytes>> {
        answer(&Method::GET, path, &HeaderMap::new())
    }

    #[test]
    fn the_page_names_its_assets_by_hash_and_they_are_immutable() {
        let page = get("/ui/");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(page.headers()[header::CACHE_CONTROL], "no-cache");
        assert_eq!(page.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        let index = &assets().index.body;
        let text = std::str::from_utf8(index).unwrap();
        assert!(!text.contains("{{version}}"));
        assert!(text.contains("app.js?v="));
        let script = get("/ui/app.js");
        assert_eq!(
            script.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert!(script.headers()[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable"));
    }

    #[test]
    fn revalidation_redirects_and_unknown_files() {
        let etag = get("/ui/app.css").headers()[header::ETAG].clone();
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            answer(&Method::GET, "/ui/app.css", &headers).status(),
            StatusCode::NOT_MODIFIED
        );
        let redirect = get("/ui");
        assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(redirect.headers()[header::LOCATION], "/ui/");
        assert_eq!(get("/ui/secret.txt").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            answer(&Method::POST, "/ui/", &HeaderMap::new()).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn the_script_never_writes_html() {
        assert!(!SCRIPT.contains("innerHTML"));
        assert!(!SCRIPT.contains("outerHTML"));
        assert!(!SCRIPT.contains("insertAdjacentHTML"));
        assert!(!SCRIPT.contains("document.write"));
    }
}
