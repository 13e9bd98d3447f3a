//! The tenants file (`--tenants FILE`): who the clients are, by the keys they present, and
//! what each may use. Read whole, checked whole: a file with a mistake is refused with a
//! message naming it (at start, an error; on a reload, a warning and the previous table
//! stays).

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

/// The most a tenants file may hold, in bytes: it is read whole.
const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: Vec<TenantEntry>,
    /// Bounds of the router's queue per priority band.
    #[serde(default)]
    bands: Vec<BandEntry>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    #[serde(default)]
    keys: Vec<String>,
    /// An environment variable holding more keys, comma-separated.
    keys_env: Option<String>,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default)]
    priority: i32,
    best_priority: Option<i32>,
    #[serde(default)]
    limits: Limits,
}

fn one() -> f64 {
    1.0
}

/// What a tenant may use; each absent limit is no limit.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limits {
    pub(crate) requests_per_minute: Option<u64>,
    pub(crate) tokens_per_minute: Option<u64>,
    /// Requests of the tenant admitted at once (more wait in the router's queue).
    pub(crate) concurrent: Option<usize>,
    /// The longest prompt (estimated tokens) a request may carry.
    pub(crate) max_prompt_tokens: Option<u64>,
    /// Requests of the tenant waiting in the router's queue at once (more: 429).
    pub(crate) max_queued: Option<usize>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct BandEntry {
    priority: i32,
    max_queued: Option<usize>,
    queue_timeout_secs: Option<f64>,
}

/// One tenant as the file says it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TenantSpec {
    pub(crate) name: String,
    pub(crate) keys: Vec<String>,
    pub(crate) weight: f64,
    /// Its requests' priority when they name none (vLLM's order: lower is served first).
    pub(crate) priority: i32,
    /// The lowest priority value its requests may ask for.
    pub(crate) best_priority: i32,
    pub(crate) limits: Limits,
}

/// A priority band's own queue bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BandSpec {
    pub(crate) priority: i32,
    pub(crate) max_queued: Option<usize>,
    pub(crate) queue_timeout: Option<std::time::Duration>,
}

/// The file, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TenantsSpec {
    pub(crate) tenants: Vec<TenantSpec>,
    pub(crate) bands: Vec<BandSpec>,
}

/// The name of the tenant whose keys are `--client-api-key`'s (and of everyone, without a
/// tenants file). A file may describe it like any other (without keys).
pub(crate) const DEFAULT_TENANT: &str = "default";

/// Reads and checks a tenants file; `env` reads an environment variable (keys_env).
pub(crate) fn read(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<TenantsSpec, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("--tenants {shown}: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("--tenants {shown}: {} bytes, more than the {MAX_FILE_BYTES} a tenants file may hold", meta.len()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("--tenants {shown}: {e}"))?;
    parse(&text, env).map_err(|e| format!("--tenants {shown}: {e}"))
}

pub(crate) fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<TenantsSpec, String> {
    let file: TenantsFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut names = HashSet::new();
    let mut keys_seen = HashSet::new();
    let mut tenants = Vec::with_capacity(file.tenants.len());
    for t in file.tenants {
        let who = format!("tenant {:?}", t.name);
        if t.name.is_empty() || t.name.len() > 64 || !t.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(format!("{who}: a name is 1-64 characters of letters, digits, '-', '_' or '.'"));
        }
        if !names.insert(t.name.clone()) {
            return Err(format!("{who} is named twice"));
        }
        if !(t.weight.is_finite() && t.weight > 0.0 && t.weight <= 1e6) {
            return Err(format!("{who}: weight must be a number above 0 (and at most 1e6), not {}", t.weight));
        }
        let best_priority = t.best_priority.unwrap_or(t.priority);
        if best_priority > t.priority {
            return Err(format!(
                "{who}: best_priority {best_priority} is above its default priority {} (lower is served first; \
                 best_priority is the lowest value it may ask for)",
                t.priority
            ));
        }
        let mut keys = t.keys;
        if let Some(var) = &t.keys_env {
            let value = env(var).ok_or_else(|| format!("{who}: keys_env {var} is not set"))?;
            keys.extend(value.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned));
        }
        for k in &keys {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("{who}: a key must be printable ASCII without spaces"));
            }
            if !keys_seen.insert(k.clone()) {
                return Err(format!("{who}: a key is listed for two tenants (or twice)"));
            }
        }
        if t.name == DEFAULT_TENANT && !keys.is_empty() {
            return Err(format!("{who}: the default tenant's keys are --client-api-key's; it lists none here"));
        }
        let l = &t.limits;
        if l.requests_per_minute == Some(0) || l.tokens_per_minute == Some(0) || l.concurrent == Some(0) {
            return Err(format!("{who}: a limit of 0 would refuse every request; leave it out for no limit"));
        }
        tenants.push(TenantSpec { name: t.name, keys, weight: t.weight, priority: t.priority, best_priority, limits: t.limits });
    }
    let mut bands = Vec::with_capacity(file.bands.len());
    for b in file.bands {
        if bands.iter().any(|x: &BandSpec| x.priority == b.priority) {
            return Err(format!("band {} is described twice", b.priority));
        }
        let queue_timeout = match b.queue_timeout_secs {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Some(std::time::Duration::from_secs_f64(s)),
            Some(s) => return Err(format!("band {}: queue_timeout_secs must be above 0 and at most a day, not {s}", b.priority)),
        };
        bands.push(BandSpec { priority: b.priority, max_queued: b.max_queued, queue_timeout });
    }
    Ok(TenantsSpec { tenants, bands })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_issue_example_reads_with_its_defaults() {
        let text =
            "tenants:\n  - name: batch\n    keys: [sk-batch-1, sk-batch-2]\n    weight: 1\n    priority: 10\n    best_priority: 5\n    \
                    limits: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent: 64, max_prompt_tokens: 32768}\n  \
                    - name: interactive\n    keys_env: CHAT_KEYS\n    weight: 4\n    priority: 0\n";
        let env = |n: &str| (n == "CHAT_KEYS").then(|| "sk-chat, sk-chat-2".to_string());
        let spec = parse(text, &env).unwrap();
        assert_eq!(spec.tenants.len(), 2);
        let batch = &spec.tenants[0];
        assert_eq!((batch.priority, batch.best_priority, batch.weight), (10, 5, 1.0));
        assert_eq!(batch.limits.tokens_per_minute, Some(200_000));
        assert_eq!(batch.limits.concurrent, Some(64));
        let chat = &spec.tenants[1];
        assert_eq!(chat.keys, ["sk-chat", "sk-chat-2"]);
        assert_eq!(chat.best_priority, 0, "without best_priority, the default is the best");
        assert_eq!(chat.limits, Limits::default());
    }

    #[test]
    fn mistakes_are_named() {
        let bad = [
            ("tenants:\n  - name: a\n    keys: [k]\n  - name: a\n", "named twice"),
            ("tenants:\n  - name: a\n    keys: [k]\n  - name: b\n    keys: [k]\n", "two tenants"),
            ("tenants:\n  - name: a\n    priority: 1\n    best_priority: 3\n", "best_priority 3"),
            ("tenants:\n  - name: a\n    weight: 0\n", "weight"),
            ("tenants:\n  - name: a\n    keys_env: NOPE\n", "NOPE is not set"),
            ("tenants:\n  - name: a\n    limits: {requests_per_minute: 0}\n", "limit of 0"),
            ("tenants:\n  - name: a\n    limts: {}\n", "unknown field"),
            ("tenants:\n  - name: default\n    keys: [k]\n", "--client-api-key"),
            ("tenants: []\nbands:\n  - {priority: 1}\n  - {priority: 1}\n", "twice"),
        ];
        for (text, says) in bad {
            let err = parse(text, &no_env).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
