//! Which configured key a request presents: `Authorization: Bearer <key>`, or for client
//! keys also `x-api-key: <key>` (the Anthropic SDK's header). Every key is compared, each
//! in constant time, so the time taken says nothing of which key (if any) matched. The
//! front door's guard (front/mod.rs) and the Responses store's owners (responses/mod.rs)
//! both read keys here.

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use super::AuthConfig;

/// The token of `Authorization: Bearer <token>`.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().as_bytes())
}

/// The key among `keys` that `token` is, comparing it with every key.
pub(crate) fn matching<'k>(keys: &'k [String], token: &[u8]) -> Option<&'k str> {
    keys.iter().fold(None, |found, k| if bool::from(k.as_bytes().ct_eq(token)) { Some(k.as_str()) } else { found })
}

/// Whether `headers` carry `Authorization: Bearer <one of keys>`.
pub(crate) fn bearer_matches(headers: &HeaderMap, keys: &[String]) -> bool {
    bearer_token(headers).and_then(|t| matching(keys, t)).is_some()
}

/// The keys a request presents as a client: its bearer token, then its `x-api-key`.
pub(crate) fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    bearer_token(headers).into_iter().chain(headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii()))
}

impl AuthConfig {
    /// The client key a request presents: as a bearer token, else as `x-api-key`.
    pub(crate) fn client_key_of(&self, headers: &HeaderMap) -> Option<&str> {
        presented_keys(headers).find_map(|t| matching(&self.client_keys, t))
    }
}

#[cfg(test)]
mod tests {
    use crate::router::config::keys::*;

    #[test]
    fn a_key_is_found_by_either_header_and_only_when_it_is_configured() {
        let auth = AuthConfig { client_keys: vec!["sk-a".into(), "sk-b".into()], ..AuthConfig::default() };
        let with = |name: &str, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            h
        };
        assert_eq!(auth.client_key_of(&with("authorization", "Bearer sk-b")), Some("sk-b"));
        assert_eq!(auth.client_key_of(&with("authorization", "bearer  sk-a ")), Some("sk-a"));
        assert_eq!(auth.client_key_of(&with("x-api-key", "sk-a")), Some("sk-a"));
        assert_eq!(auth.client_key_of(&with("authorization", "Basic sk-a")), None);
        assert_eq!(auth.client_key_of(&with("x-api-key", "sk-c")), None);
        assert!(bearer_matches(&with("authorization", "Bearer sk-a"), &auth.client_keys));
        assert!(!bearer_matches(&with("x-api-key", "sk-a"), &auth.client_keys), "the bearer check reads the bearer only");
    }
}
