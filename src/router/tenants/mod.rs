//! Tenants: who a client is (by the key it presents), the priority its requests run at,
//! and the limits it has (`--tenants FILE`, file.rs; reloaded when the file changes).
//! Without the file every client is the one `default` tenant: no limits, priority 0.
//!
//! A tenant's requests and tokens per minute are checked and charged here, when a request
//! arrives (limits.rs); its concurrent requests and its share of the engines are the
//! router's queue's business (router/admission/).

pub(crate) mod file;
pub(crate) mod limits;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;

use crate::api::{ApiError, ErrorKind, Quota};
use crate::router::config::keys::presented_keys;
use crate::router::request::body::ClientBody;
use file::{BandSpec, Limits, TenantSpec, TenantsSpec, DEFAULT_TENANT};
use limits::{Bucket, RateHeaders, Short};

/// How often the tenants file is looked at for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The header a client may name its request's priority in (as the body's `priority`).
pub(crate) const PRIORITY_HEADER: &str = "x-priority";

/// One tenant: what the file says of it now, and what it has used.
pub(crate) struct Tenant {
    pub(crate) name: Arc<str>,
    spec: RwLock<TenantSpec>,
    buckets: Mutex<Buckets>,
    /// Its requests holding an admission permit.
    pub(crate) admitted: AtomicUsize,
}

#[derive(Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// A request's estimated cost in tokens: what its tokens-per-minute are charged and what
/// fair shares weigh.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cost {
    /// The prompt's tokens, estimated as OpenAI's rule of thumb has it: 4 bytes a token.
    pub(crate) prompt: u64,
    /// The output it may make (`max_tokens` and its kin, when given).
    pub(crate) output: u64,
}

impl Cost {
    pub(crate) fn total(self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

/// A request a tenant's limits refuse.
pub(crate) struct Limited {
    pub(crate) error: Box<ApiError>,
    pub(crate) headers: RateHeaders,
}

impl Tenant {
    fn new(spec: TenantSpec) -> Self {
        let tenant = Tenant {
            name: Arc::from(spec.name.as_str()),
            spec: RwLock::new(spec.clone()),
            buckets: Mutex::default(),
            admitted: AtomicUsize::new(0),
        };
        tenant.set(spec);
        tenant
    }

    /// The file's new word on this tenant; what it used stays used.
    fn set(&self, spec: TenantSpec) {
        let now = Instant::now();
        {
            let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            let set = |bucket: &mut Option<Bucket>, limit: Option<u64>| match (bucket.as_mut(), limit) {
                (Some(b), Some(l)) => b.set_limit(l, now),
                (None, Some(l)) => *bucket = Some(Bucket::new(l, now)),
                (_, None) => *bucket = None,
            };
            set(&mut b.requests, spec.limits.requests_per_minute);
            set(&mut b.tokens, spec.limits.tokens_per_minute);
        }
        *self.spec.write().unwrap_or_else(|e| e.into_inner()) = spec;
    }

    fn spec(&self) -> std::sync::RwLockReadGuard<'_, TenantSpec> {
        self.spec.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Its fair-share weight within a priority band.
    pub(crate) fn weight(&self) -> f64 {
        self.spec().weight
    }

    pub(crate) fn limits(&self) -> Limits {
        self.spec().limits
    }

    /// The priority a request runs at: the one it asks for (body or header), no better
    /// than the tenant's best; its default when it asks for none.
    pub(crate) fn priority(&self, asked: Option<i32>) -> i32 {
        let s = self.spec();
        asked.unwrap_or(s.priority).max(s.best_priority)
    }

    /// Checks a request against the tenant's limits and charges it: both allowances or none.
    pub(crate) fn charge(&self, cost: Cost) -> Result<RateHeaders, Limited> {
        let limits = self.limits();
        if let Some(max) = limits.max_prompt_tokens {
            if cost.prompt > max {
                return Err(Limited {
                    error: Box::new(ApiError::bad_request(format!(
                        "this request's prompt is about {} tokens; tenant {} may send at most {max} (max_prompt_tokens)",
                        cost.prompt, self.name
                    ))),
                    headers: self.headers(),
                });
            }
        }
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let checks = [
            (Quota::Requests, b.requests.as_mut().map(|r| r.check(1, now))),
            (Quota::Tokens, b.tokens.as_mut().map(|t| t.check(cost.total(), now))),
        ];
        for (quota, check) in checks {
            let Some(Err(short)) = check else { continue };
            let (limit, unit) = match quota {
                Quota::Requests => (limits.requests_per_minute, "requests"),
                Quota::Tokens => (limits.tokens_per_minute, "tokens"),
            };
            let limit = limit.unwrap_or(0);
            let (message, wait) = match short {
                Short::For(wait) => (
                    format!(
                        "Rate limit reached for tenant {} on {unit} per min: Limit {limit}, Requested {}. Please try again in {}.",
                        self.name,
                        if quota == Quota::Requests { 1 } else { cost.total() },
                        limits::openai_duration(wait)
                    ),
                    wait,
                ),
                Short::Never => (
                    format!(
                        "Request too large for tenant {} on tokens per min: Limit {limit}, Requested {}. Send fewer tokens (or a smaller max_tokens).",
                        self.name,
                        cost.total()
                    ),
                    Duration::from_secs(60),
                ),
            };
            let headers = view(&b);
            let error =
                Box::new(ApiError::new(ErrorKind::QuotaExceeded(quota), message).retry_after(wait.as_secs_f64().ceil().max(1.0) as u64));
            return Err(Limited { error, headers });
        }
        if let Some(r) = b.requests.as_mut() {
            r.take(1);
        }
        if let Some(t) = b.tokens.as_mut() {
            t.take(cost.total());
        }
        Ok(view(&b))
    }

    /// Its allowances as they are (for an answer that charged nothing).
    pub(crate) fn headers(&self) -> RateHeaders {
        view(&self.buckets.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn view(b: &Buckets) -> RateHeaders {
    RateHeaders { requests: b.requests.as_ref().map(Bucket::view), tokens: b.tokens.as_ref().map(Bucket::view) }
}

/// The priority a request asks for: vLLM's `priority` field (an integer), else the
/// `x-priority` header; None when it asks for none.
pub(crate) fn asked_priority(headers: &HeaderMap, body: &ClientBody) -> Result<Option<i32>, ApiError> {
    let out_of_range =
        |p: i64| ApiError::bad_request(format!("priority {p} is out of range (a 32-bit integer; lower is served first)")).param("priority");
    if body.has("priority") {
        // As vLLM reads it (pydantic's lax int: `5` and `"5"`, not `5.5`).
        let fields = body.subset(&["priority"])?;
        return match crate::api::fields::Fields::body(&fields).int("priority")? {
            None => Ok(None),
            Some(p) => i32::try_from(p).map(Some).map_err(|_| out_of_range(p)),
        };
    }
    match headers.get(PRIORITY_HEADER) {
        None => Ok(None),
        Some(h) => h.to_str().ok().and_then(|s| s.trim().parse::<i32>().ok()).map(Some).ok_or_else(|| {
            ApiError::bad_request("the x-priority header must be a 32-bit integer (lower is served first)").param("priority")
        }),
    }
}

/// A request's estimated cost: its body's bytes / 4 for the prompt, and its output limit
/// (`max_tokens`, `max_completion_tokens` or `max_output_tokens`) per generation.
pub(crate) fn estimate(body: &ClientBody, generations: usize) -> Cost {
    let output = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.hint(k).and_then(|v| v.as_u64()))
        .unwrap_or(0)
        .min(1 << 24);
    Cost { prompt: (body.raw().len() as u64).div_ceil(4), output: output.saturating_mul(generations as u64) }
}

/// The tenants as the file says now.
struct Table {
    /// By the SHA-256 of each key (a lookup compares digests, never keys).
    by_key: HashMap<[u8; 32], Arc<Tenant>>,
    default: Arc<Tenant>,
    all: Vec<Arc<Tenant>>,
    bands: Vec<BandSpec>,
    /// The priorities the file names: the values per-priority metrics are labelled with.
    priorities: BTreeSet<i32>,
}

/// Every tenant, by key; the file they come from, reloaded when it changes.
pub(crate) struct Tenants {
    table: RwLock<Arc<Table>>,
    path: Option<PathBuf>,
    /// Router replicas sharing the limits (`--router-replicas`): each enforces its share.
    replicas: u32,
}

fn digest(key: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn divided(limit: Option<u64>, replicas: u32) -> Option<u64> {
    limit.map(|l| l.div_ceil(u64::from(replicas)).max(1))
}

impl Tenants {
    /// Without a file: everyone is the default tenant.
    pub(crate) fn none() -> Self {
        let spec = TenantsSpec { tenants: Vec::new(), bands: Vec::new() };
        Tenants { table: RwLock::new(Arc::new(Table::build(spec, None, 1))), path: None, replicas: 1 }
    }

    /// From `--tenants FILE` (an error names the file's mistake).
    pub(crate) fn load(path: PathBuf, replicas: u32) -> Result<Self, String> {
        let spec = file::read(&path, &|v| std::env::var(v).ok())?;
        let tenants = Tenants { table: RwLock::new(Arc::new(Table::build(spec, None, replicas))), path: Some(path), replicas };
        Ok(tenants)
    }

    /// Whether a tenants file is in use.
    pub(crate) fn configured(&self) -> bool {
        self.path.is_some()
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The file's key the request presents (as a bearer token or `x-api-key`, as client keys
    /// are read), and its tenant; None without a tenants file.
    pub(crate) fn key_of<'h>(&self, headers: &'h HeaderMap) -> Option<(&'h [u8], Arc<Tenant>)> {
        if !self.configured() {
            return None;
        }
        let table = self.table();
        presented_keys(headers).find_map(|k| table.by_key.get(&digest(k)).map(|t| (k, t.clone())))
    }

    /// The tenant whose key the request presents, if it presents one of the file's.
    pub(crate) fn by_key(&self, headers: &HeaderMap) -> Option<Arc<Tenant>> {
        self.key_of(headers).map(|(_, t)| t)
    }

    /// The tenant `by_key` found, else the default tenant.
    pub(crate) fn or_default(&self, found: Option<Arc<Tenant>>) -> Arc<Tenant> {
        found.unwrap_or_else(|| self.table().default.clone())
    }

    /// The request's tenant: by its key, else the default tenant.
    pub(crate) fn of(&self, headers: &HeaderMap) -> Arc<Tenant> {
        self.or_default(self.by_key(headers))
    }

    pub(crate) fn all(&self) -> Vec<Arc<Tenant>> {
        self.table().all.clone()
    }

    /// A priority band's own bounds, as the file says.
    pub(crate) fn band(&self, priority: i32) -> Option<BandSpec> {
        self.table().bands.iter().find(|b| b.priority == priority).copied()
    }

    /// The best (lowest) priority any tenant may have.
    pub(crate) fn best_priority(&self) -> i32 {
        self.table().all.iter().map(|t| t.spec().best_priority).min().unwrap_or(0)
    }

    /// The label a priority is counted under: the value, when the file names it.
    pub(crate) fn priority_label(&self, priority: i32) -> String {
        if priority == 0 || self.table().priorities.contains(&priority) {
            priority.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Reads the file again; the tenants that stay keep what they used.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.path else { return Ok(()) };
        let spec = file::read(path, &|v| std::env::var(v).ok())?;
        let old = self.table();
        let table = Table::build(spec, Some(&old), self.replicas);
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(())
    }

    /// Reloads the file whenever it changes (its modification time or size).
    pub(crate) async fn reload_on_change(self: Arc<Self>) {
        let Some(path) = self.path.clone() else { return };
        let stamp = || std::fs::metadata(&path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut seen = stamp();
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            let now = stamp();
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload() {
                Ok(()) => tracing::info!(file = %path.display(), tenants = self.table().all.len(), "tenants file changed; reloaded"),
                Err(e) => tracing::warn!("tenants file changed but does not load ({e}); the previous tenants stay in force"),
            }
        }
    }
}

impl Table {
    fn build(spec: TenantsSpec, old: Option<&Table>, replicas: u32) -> Self {
        let mut priorities = BTreeSet::new();
        let mut by_key = HashMap::new();
        let mut all = Vec::new();
        let mut default = None;
        let has_default = spec.tenants.iter().any(|t| t.name == DEFAULT_TENANT);
        let default_spec = TenantSpec {
            name: DEFAULT_TENANT.to_string(),
            keys: Vec::new(),
            weight: 1.0,
            priority: 0,
            best_priority: 0,
            limits: Limits::default(),
        };
        let specs = spec.tenants.into_iter().chain((!has_default).then_some(default_spec));
        for mut t in specs {
            priorities.insert(t.priority);
            priorities.insert(t.best_priority);
            let l = &mut t.limits;
            l.requests_per_minute = divided(l.requests_per_minute, replicas);
            l.tokens_per_minute = divided(l.tokens_per_minute, replicas);
            l.concurrent = divided(l.concurrent.map(|c| c as u64), replicas).map(|c| c as usize);
            let keys = std::mem::take(&mut t.keys);
            let tenant = match old.and_then(|o| o.all.iter().find(|x| *x.name == *t.name)) {
                Some(kept) => {
                    kept.set(t);
                    kept.clone()
                }
                None => Arc::new(Tenant::new(t)),
            };
            for k in keys {
                by_key.insert(digest(k.as_bytes()), tenant.clone());
            }
            if *tenant.name == *DEFAULT_TENANT {
                default = Some(tenant.clone());
            }
            all.push(tenant);
        }
        priorities.extend(spec.bands.iter().map(|b| b.priority));
        Table { by_key, default: default.expect("the default tenant is always there"), all, bands: spec.bands, priorities }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("disagg-tenants-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("tenants.yaml")
    }

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {key}").parse().unwrap());
        h
    }

    #[test]
    fn keys_find_their_tenant_and_a_reload_keeps_what_was_used() {
        let path = temp_file();
        std::fs::write(
            &path,
            "tenants:\n  - name: a\n    keys: [sk-a]\n    priority: 10\n    best_priority: 5\n    limits: {requests_per_minute: 3}\n",
        )
        .unwrap();
        let t = Tenants::load(path.clone(), 1).unwrap();
        let a = t.of(&headers("sk-a"));
        assert_eq!(&*a.name, "a");
        assert_eq!(&*t.of(&headers("sk-other")).name, DEFAULT_TENANT);
        let mut both = headers("sk-other");
        both.insert("x-api-key", "sk-a".parse().unwrap());
        assert_eq!(&*t.of(&both).name, "a", "read as client keys are: the bearer, then x-api-key");
        assert_eq!((a.priority(None), a.priority(Some(0)), a.priority(Some(7))), (10, 5, 7), "default, capped, as asked");
        for left in [2, 1, 0] {
            assert_eq!(a.charge(Cost::default()).ok().unwrap().requests.unwrap().remaining, left);
        }
        let refused = a.charge(Cost::default()).err().unwrap();
        assert_eq!(refused.error.status, 429);
        assert_eq!(refused.error.body()["error"]["code"], "rate_limit_exceeded");
        assert_eq!(refused.error.body()["error"]["type"], "requests");
        assert!(refused.error.retry_after_secs.unwrap() >= 1);
        std::fs::write(&path, "tenants:\n  - name: a\n    keys: [sk-a2]\n    limits: {requests_per_minute: 4}\n").unwrap();
        t.reload().unwrap();
        let a2 = t.of(&headers("sk-a2"));
        assert!(Arc::ptr_eq(&a, &a2), "the same tenant, kept by name");
        assert_eq!(&*t.of(&headers("sk-a")).name, DEFAULT_TENANT, "a key taken out of the file no longer names the tenant");
        assert_eq!(a2.charge(Cost::default()).ok().unwrap().requests.unwrap().remaining, 0, "3 of 4 used before the reload");
    }

    #[test]
    fn replicas_split_the_limits() {
        let path = temp_file();
        std::fs::write(&path, "tenants:\n  - name: a\n    keys: [sk-a]\n    limits: {requests_per_minute: 10, concurrent: 3}\n").unwrap();
        let a = Tenants::load(path, 2).unwrap().of(&headers("sk-a"));
        assert_eq!(a.limits().requests_per_minute, Some(5));
        assert_eq!(a.limits().concurrent, Some(2));
    }
}
