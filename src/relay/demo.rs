//! The H5 live-room demo (`examples/h5/`), compiled into the binary and served by a plain
//! HTTP GET on the relay port when [`super::Config::demo`] is on (protocol.md, section 14).

/// The demo page.
const INDEX_HTML: &str = include_str!("../../examples/h5/index.html");
/// The browser client module the page imports.
const IMRELAY_JS: &str = include_str!("../../examples/h5/imrelay.js");

/// The content type and body served for `path`, if it names a demo file.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX_HTML)),
        "/imrelay.js" => Some(("text/javascript; charset=utf-8", IMRELAY_JS)),
        _ => None,
    }
}
