//! A worker's URL as the router keys it: `http(s)://host:port[/path]`.

/// Normalises a worker address to `http(s)://host:port[/path]` (no trailing slash).
pub(crate) fn normalize_url(raw: &str) -> Result<String, String> {
    let with_scheme = if raw.contains("://") { raw.to_string() } else { format!("http://{raw}") };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| format!("invalid worker URL `{raw}`: {e}"))?;
    let scheme = match url.scheme() {
        s @ ("http" | "https") => s,
        s => return Err(format!("worker URL `{raw}`: unsupported scheme `{s}` (http or https)")),
    };
    let host = url.host_str().ok_or_else(|| format!("worker URL `{raw}` has no host"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("worker URL `{raw}`: no query or fragment allowed"));
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let path = url.path().trim_end_matches('/');
    // `host_str` keeps IPv6 brackets, so the result is a valid URL again.
    Ok(format!("{scheme}://{host}:{port}{path}"))
}
