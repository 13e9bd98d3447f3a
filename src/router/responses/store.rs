//! The Responses store: one row per stored response — its id, whose it is (a digest of the
//! client key that made it, or none), when, the response as the client got it, and the
//! conversation the next turn continues. SQLite in a file (the default; calls run on the
//! blocking pool, the connection's lock held only inside them) or PostgreSQL (several
//! router replicas share it; one pipelined connection, opened again when it breaks).
//! Both are opened at the first call, so a router that serves no Responses pays nothing.
//! Bounds: rows older than the TTL are neither read nor kept, and at most `max_stored`
//! rows are kept (the oldest go), both enforced at every write.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::OnceCell;

use crate::router::config::responses::{ResponsesConfig, StoreKind};

/// One stored response.
#[derive(Clone, Debug)]
pub(crate) struct StoredResponse {
    /// The response as the client got it (JSON).
    pub(crate) response: String,
    /// The input items a turn continuing this response starts with (JSON array).
    pub(crate) history: String,
}

/// Who may read and continue a response: a digest of the client key that made it (empty
/// where the router checks no client keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Owner(pub(crate) String);

pub(crate) struct ResponseStore {
    kind: StoreKind,
    ttl: Duration,
    max_stored: u64,
    /// The longest one call may take (--responses-store-timeout-secs).
    timeout: Duration,
    sqlite: OnceCell<Arc<Mutex<rusqlite::Connection>>>,
    postgres: Mutex<Option<Arc<tokio_postgres::Client>>>,
}

const SQLITE_SCHEMA: &str = "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;
    CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created INTEGER NOT NULL,
        response TEXT NOT NULL, history TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS responses_created ON responses(created);";

const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS disagg_responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL,
        created BIGINT NOT NULL, response TEXT NOT NULL, history TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS disagg_responses_created ON disagg_responses(created);";

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl ResponseStore {
    pub(crate) fn new(cfg: &ResponsesConfig) -> Self {
        ResponseStore {
            kind: cfg.store.clone(),
            ttl: cfg.ttl,
            max_stored: cfg.max_stored,
            timeout: cfg.timeout,
            sqlite: OnceCell::new(),
            postgres: Mutex::new(None),
        }
    }

    /// Whether responses are stored at all (`--responses-store off`: no).
    pub(crate) fn enabled(&self) -> bool {
        self.kind != StoreKind::Off
    }

    /// The oldest creation time still readable.
    fn oldest(&self) -> i64 {
        now_secs().saturating_sub(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX))
    }

    pub(crate) async fn put(&self, id: &str, owner: &Owner, stored: &StoredResponse) -> Result<(), String> {
        self.bounded(self.put_now(id, owner, stored)).await
    }

    /// The response `id` if `owner` made it and it has not expired.
    pub(crate) async fn get(&self, id: &str, owner: &Owner) -> Result<Option<StoredResponse>, String> {
        self.bounded(self.get_now(id, owner)).await
    }

    /// Deletes the response `id` if `owner` made it; whether there was one.
    pub(crate) async fn delete(&self, id: &str, owner: &Owner) -> Result<bool, String> {
        self.bounded(self.delete_now(id, owner)).await
    }

    /// A store call within --responses-store-timeout-secs (connecting included): a stalled
    /// store never holds a request, its permit or its connection longer.
    async fn bounded<T>(&self, call: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
        tokio::time::timeout(self.timeout, call).await.unwrap_or_else(|_| {
            Err(format!("the store did not answer within {:.1}s (--responses-store-timeout-secs)", self.timeout.as_secs_f64()))
        })
    }

    async fn put_now(&self, id: &str, owner: &Owner, stored: &StoredResponse) -> Result<(), String> {
        let (created, oldest, max) = (now_secs(), self.oldest(), i64::try_from(self.max_stored).unwrap_or(i64::MAX));
        match &self.kind {
            StoreKind::Off => Ok(()),
            StoreKind::Sqlite(path) => {
                let (id, owner, s) = (id.to_string(), owner.0.clone(), stored.clone());
                self.with_sqlite(path, move |c| {
                    let tx = c.unchecked_transaction()?;
                    tx.execute(
                        "INSERT OR REPLACE INTO responses (id, owner, created, response, history) VALUES (?1, ?2, ?3, ?4, ?5)",
                        rusqlite::params![id, owner, created, s.response, s.history],
                    )?;
                    tx.execute("DELETE FROM responses WHERE created < ?1", [oldest])?;
                    tx.execute(
                        "DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created DESC, rowid DESC LIMIT -1 OFFSET ?1)",
                        [max],
                    )?;
                    tx.commit()
                })
                .await
            }
            StoreKind::Postgres(_) => {
                let c = self.postgres().await?;
                c.execute(
                    "INSERT INTO disagg_responses (id, owner, created, response, history) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (id) DO UPDATE SET owner = $2, created = $3, response = $4, history = $5",
                    &[&id, &owner.0, &created, &stored.response, &stored.history],
                )
                .await
                .map_err(pg_error)?;
                c.execute("DELETE FROM disagg_responses WHERE created < $1", &[&oldest]).await.map_err(pg_error)?;
                c.execute(
                    "DELETE FROM disagg_responses WHERE id IN
                     (SELECT id FROM disagg_responses ORDER BY created DESC, id DESC OFFSET $1)",
                    &[&max],
                )
                .await
                .map_err(pg_error)?;
                Ok(())
            }
        }
    }

    async fn get_now(&self, id: &str, owner: &Owner) -> Result<Option<StoredResponse>, String> {
        let oldest = self.oldest();
        match &self.kind {
            StoreKind::Off => Ok(None),
            StoreKind::Sqlite(path) => {
                let (id, owner) = (id.to_string(), owner.0.clone());
                self.with_sqlite(path, move |c| {
                    use rusqlite::OptionalExtension;
                    c.query_row(
                        "SELECT response, history FROM responses WHERE id = ?1 AND owner = ?2 AND created >= ?3",
                        rusqlite::params![id, owner, oldest],
                        |r| Ok(StoredResponse { response: r.get(0)?, history: r.get(1)? }),
                    )
                    .optional()
                })
                .await
            }
            StoreKind::Postgres(_) => {
                let c = self.postgres().await?;
                let row = c
                    .query_opt(
                        "SELECT response, history FROM disagg_responses WHERE id = $1 AND owner = $2 AND created >= $3",
                        &[&id, &owner.0, &oldest],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok(row.map(|r| StoredResponse { response: r.get(0), history: r.get(1) }))
            }
        }
    }

    async fn delete_now(&self, id: &str, owner: &Owner) -> Result<bool, String> {
        let oldest = self.oldest();
        match &self.kind {
            StoreKind::Off => Ok(false),
            StoreKind::Sqlite(path) => {
                let (id, owner) = (id.to_string(), owner.0.clone());
                self.with_sqlite(path, move |c| {
                    c.execute("DELETE FROM responses WHERE id = ?1 AND owner = ?2 AND created >= ?3", rusqlite::params![id, owner, oldest])
                        .map(|n| n > 0)
                })
                .await
            }
            StoreKind::Postgres(_) => {
                let c = self.postgres().await?;
                let n = c
                    .execute("DELETE FROM disagg_responses WHERE id = $1 AND owner = $2 AND created >= $3", &[&id, &owner.0, &oldest])
                    .await
                    .map_err(pg_error)?;
                Ok(n > 0)
            }
        }
    }

    /// Runs `f` on the SQLite connection (opened on first use) on the blocking pool.
    async fn with_sqlite<T: Send + 'static>(
        &self,
        path: &Path,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let conn = self
            .sqlite
            .get_or_try_init(|| {
                let path = path.to_path_buf();
                async move {
                    tokio::task::spawn_blocking(move || open_sqlite(&path))
                        .await
                        .map_err(|e| format!("opening the SQLite store: {e}"))?
                        .map(|c| Arc::new(Mutex::new(c)))
                }
            })
            .await?
            .clone();
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&c).map_err(|e| format!("the SQLite store: {e}"))
        })
        .await
        .map_err(|e| format!("the SQLite store: {e}"))?
    }

    /// The PostgreSQL connection: the open one, or a new one when there is none or it broke.
    /// The lock is held only to read or swap the handle, never across the connect.
    async fn postgres(&self) -> Result<Arc<tokio_postgres::Client>, String> {
        let StoreKind::Postgres(url) = &self.kind else { unreachable!("only the PostgreSQL store connects") };
        if let Some(c) = self.postgres.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
        let (client, connection) = connect.await.map_err(pg_error)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("the PostgreSQL store's connection ended: {e}");
            }
        });
        client.batch_execute(POSTGRES_SCHEMA).await.map_err(pg_error)?;
        let client = Arc::new(client);
        *self.postgres.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(client.clone());
        Ok(client)
    }
}

fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let c = rusqlite::Connection::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    c.execute_batch(SQLITE_SCHEMA).map_err(|e| format!("preparing {}: {e}", path.display()))?;
    Ok(c)
}

fn pg_error(e: tokio_postgres::Error) -> String {
    format!("the PostgreSQL store: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path, max_stored: u64, ttl: Duration) -> ResponseStore {
        ResponseStore::new(&ResponsesConfig {
            store: StoreKind::Sqlite(dir.join("r.sqlite3")),
            ttl,
            max_stored,
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(10),
        })
    }

    fn row(n: u32) -> StoredResponse {
        StoredResponse { response: format!("{{\"n\":{n}}}"), history: "[]".into() }
    }

    #[tokio::test]
    async fn sqlite_keeps_owners_apart_bounds_the_count_and_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("disagg-store-{}", uuid::Uuid::new_v4().simple()));
        let (a, b) = (Owner("a".into()), Owner("b".into()));
        {
            let s = store(&dir, 3, Duration::from_secs(3600));
            s.put("r1", &a, &row(1)).await.unwrap();
            assert_eq!(s.get("r1", &a).await.unwrap().unwrap().response, "{\"n\":1}");
            assert!(s.get("r1", &b).await.unwrap().is_none(), "another owner's response is not found");
            assert!(!s.delete("r1", &b).await.unwrap(), "nor deleted");
            for n in 2..=4 {
                s.put(&format!("r{n}"), &a, &row(n)).await.unwrap();
            }
            assert!(s.get("r1", &a).await.unwrap().is_none(), "the oldest went past --responses-max-stored");
            assert!(s.get("r4", &a).await.unwrap().is_some());
            assert!(s.delete("r4", &a).await.unwrap());
            assert!(s.get("r4", &a).await.unwrap().is_none());
        }
        let reopened = store(&dir, 3, Duration::from_secs(3600));
        assert!(reopened.get("r3", &a).await.unwrap().is_some(), "a new router reads the same file");
        let expired = store(&dir, 3, Duration::ZERO);
        expired.put("r5", &a, &row(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(expired.get("r5", &a).await.unwrap().is_none(), "past its TTL a response is not read");
        std::fs::remove_dir_all(&dir).ok();
    }
}
