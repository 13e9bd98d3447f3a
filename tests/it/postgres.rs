//! A PostgreSQL server of the test's own (Debian's package, installed by scripts/deps.sh),
//! on a loopback port, in a fresh data directory, stopped when dropped; and the Responses
//! store shared by two router replicas through it.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::support::*;

pub struct Postgres {
    pub bin: PathBuf,
    data: PathBuf,
    pub port: u16,
}

/// Runs a PostgreSQL program as the `postgres` user when the test runs as root (the
/// server refuses root), else as the test's own user.
fn pg_command(bin: &std::path::Path, program: &str) -> Command {
    let path = bin.join(program);
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("no /usr/lib/postgresql: run scripts/deps.sh")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("postgres").exists())
            .expect("no PostgreSQL server: run scripts/deps.sh");
        let data = temp_dir("postgres");
        let socket = data.join("socket");
        std::fs::create_dir_all(&socket).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            assert!(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&data).status().unwrap().success());
        }
        let db = data.join("db");
        let init = pg_command(&bin, "initdb").args(["-U", "disagg", "--auth=trust", "-D"]).arg(&db).output().unwrap();
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let port = free_port();
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", socket.display());
        let log = data.join("server.log");
        let started = pg_command(&bin, "pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(&db)
            .args(["-l"])
            .arg(&log)
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Postgres { bin, data: db, port }
    }

    pub fn url(&self) -> String {
        format!("postgres://disagg@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl").args(["-D"]).arg(&self.data).args(["-m", "immediate", "stop"]).output();
    }
}

#[tokio::test]
async fn two_router_replicas_share_a_conversation_through_postgresql() {
    let pg = Postgres::start();
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let url = pg.url();
    let args = |_: ()| {
        vec!["--client-api-key", "sk-a", "--responses-store", url.as_str(), "--prefill", p.url.as_str(), "--decode", d.url.as_str()]
    };
    let a = router(&args(())).await;
    let b = router(&args(())).await;
    let auth = [("authorization", "Bearer sk-a")];
    let turn = |input: &str, prev: Option<&str>| json!({"model": "sim-model", "input": input, "max_output_tokens": 5, "temperature": 0, "previous_response_id": prev});
    let (status, r1) = post_with(&format!("{}/v1/responses", a.url), &turn("Name a river.", None), &auth).await;
    assert_eq!(status, 200, "{r1}");
    let id1 = r1["id"].as_str().unwrap();
    // The other replica continues it, and reads it back.
    let (status, r2) = post_with(&format!("{}/v1/responses", b.url), &turn("Another?", Some(id1)), &auth).await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], id1);
    let got = client().get(format!("{}/v1/responses/{}", b.url, r2["id"].as_str().unwrap())).bearer_auth("sk-a").send().await.unwrap();
    assert_eq!(got.status().as_u16(), 200);
    // And the first replica sees the second's turn: a third turn on it.
    let (status, r3) = post_with(&format!("{}/v1/responses", a.url), &turn("And one more?", r2["id"].as_str()), &auth).await;
    assert_eq!(status, 200, "{r3}");
    assert!(r3["usage"]["input_tokens"].as_u64() > r2["usage"]["input_tokens"].as_u64(), "{r2} {r3}");
    // Deleted on one replica: gone on both.
    let del = client().delete(format!("{}/v1/responses/{id1}", a.url)).bearer_auth("sk-a").send().await.unwrap();
    assert_eq!(del.status().as_u16(), 200);
    let gone = client().get(format!("{}/v1/responses/{id1}", b.url)).bearer_auth("sk-a").send().await.unwrap();
    assert_eq!(gone.status().as_u16(), 404);
}

#[tokio::test]
async fn an_unreachable_store_answers_turns_that_need_none_and_refuses_continuations_with_503() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let nowhere = format!("postgres://disagg@127.0.0.1:{}/postgres", free_port());
    let r = router(&["--responses-store", &nowhere, "--prefill", &p.url, "--decode", &d.url]).await;
    let url = format!("{}/v1/responses", r.url);
    let (status, v) = post(&url, &json!({"model": "sim-model", "input": "hi", "max_output_tokens": 3})).await;
    assert_eq!(status, 200, "answered, though not stored: {v}");
    let next = json!({"model": "sim-model", "input": "more", "previous_response_id": v["id"]});
    let (status, v) = post(&url, &next).await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("store"), "{v}");
    assert_eq!(get(&format!("{}/v1/responses/resp_x", r.url)).await.0, 503);
    assert_idle(&r.url).await;
}

/// A store that stalls (here: another session holds the table locked) answers within
/// --responses-store-timeout-secs: a continuation is a 503, a new response is answered
/// without being stored, and nothing stays held.
#[tokio::test]
async fn a_stalled_store_holds_no_request_past_its_timeout() {
    let pg = Postgres::start();
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let url = pg.url();
    let r = router(&["--responses-store", &url, "--responses-store-timeout-secs", "1", "--prefill", &p.url, "--decode", &d.url]).await;
    let responses = format!("{}/v1/responses", r.url);
    let turn = json!({"model": "sim-model", "input": "hi", "max_output_tokens": 3});
    let (status, first) = post(&responses, &turn).await;
    assert_eq!(status, 200, "{first}");
    let psql = |sql: &[&str]| {
        let mut c = tokio::process::Command::new(pg.bin.join("psql"));
        c.args(["-X", "-q", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "disagg", "-d", "postgres"]);
        for s in sql {
            c.args(["-c", s]);
        }
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).kill_on_drop(true);
        c
    };
    let _locker = psql(&["BEGIN", "LOCK TABLE disagg_responses IN ACCESS EXCLUSIVE MODE", "SELECT pg_sleep(60)"]).spawn().unwrap();
    let locked = "SELECT count(*) FROM pg_locks l JOIN pg_class c ON l.relation = c.oid \
                  WHERE c.relname = 'disagg_responses' AND l.mode = 'AccessExclusiveLock' AND l.granted";
    let held = eventually(std::time::Duration::from_secs(10), || async {
        let out = psql(&["\\pset tuples_only on", locked]).output().await.unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    })
    .await;
    assert!(held, "the other session holds the table");
    let t = std::time::Instant::now();
    let next = json!({"model": "sim-model", "input": "more", "previous_response_id": first["id"]});
    let (status, v) = post(&responses, &next).await;
    assert_eq!(status, 503, "{v}");
    let (status, v) = post(&responses, &turn).await;
    assert_eq!(status, 200, "answered, not stored: {v}");
    assert!(t.elapsed() < std::time::Duration::from_secs(8), "two calls of 1 s each took {:?}", t.elapsed());
    assert_idle(&r.url).await;
}
