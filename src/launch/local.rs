//! The local backend: this node's share of the plan as child processes, each in its own
//! process group (so its engine's own children go with it) and with a log file. Waits for
//! every /health, starts the router, prints the endpoint, then supervises: on Ctrl-C,
//! SIGTERM, or any child dying, everything is stopped (SIGTERM, then SIGKILL after a
//! grace), saying which instance failed and showing the tail of its log.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use super::plan::Plan;

/// How long after an instance died of SIGTERM the launcher's own SIGTERM may still come
/// (a step cancelled as a whole): within it, the stop is a stop, not a failure.
const SIGNAL_SKEW: Duration = Duration::from_secs(1);
/// Grace between SIGTERM and SIGKILL when stopping.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct Member {
    name: String,
    child: Child,
    /// Its process group, recorded at spawn: the group outlives the child's own pid
    /// (`Child::id()` is None once it is reaped, while its engine cores may still run).
    pgid: i32,
    log: PathBuf,
}

/// The processes of one launch; stopped (SIGKILL) if dropped without `stop`.
#[derive(Default)]
pub(crate) struct Group {
    members: Vec<Member>,
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Group {
    pub(crate) fn spawn(&mut self, name: &str, argv: &[String], env: &[(String, String)], log: &Path) -> anyhow::Result<()> {
        let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        // If the launcher dies without stopping them, the children get SIGTERM.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = Command::from(cmd).spawn().with_context(|| format!("cannot start {name}: `{}`", argv[0]))?;
        let pgid = child.id().context("a child just spawned has a pid")? as i32;
        self.members.push(Member { name: name.to_string(), child, pgid, log: log.to_path_buf() });
        Ok(())
    }

    /// The first member that has exited: its name, status and log.
    pub(crate) fn exited(&mut self) -> Option<(String, std::process::ExitStatus, PathBuf)> {
        self.members.iter_mut().find_map(|m| match m.child.try_wait() {
            Ok(Some(status)) => Some((m.name.clone(), status, m.log.clone())),
            _ => None,
        })
    }

    fn signal_all(&self, sig: i32) {
        for m in &self.members {
            unsafe {
                libc::kill(-m.pgid, sig);
            }
        }
    }

    /// SIGTERM to every process group (last started first), SIGKILL after the grace.
    pub(crate) async fn stop(&mut self) {
        self.members.reverse();
        self.signal_all(libc::SIGTERM);
        let end = Instant::now() + STOP_GRACE;
        for m in &mut self.members {
            let left = end.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, m.child.wait()).await.is_err() {
                unsafe {
                    libc::kill(-m.pgid, libc::SIGKILL);
                }
                let _ = m.child.wait().await;
            }
        }
        // The engines' own children share the group and may outlive the leader (one that
        // ignores SIGTERM, or one left by an instance that died earlier): none survives.
        for m in &self.members {
            let end = Instant::now() + STOP_GRACE;
            while group_alive(m.pgid) && Instant::now() < end {
                unsafe {
                    libc::kill(-m.pgid, libc::SIGKILL);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.members.clear();
    }
}

/// Some process of group `pgid` still exists (zombies included until reaped).
fn group_alive(pgid: i32) -> bool {
    unsafe { libc::kill(-pgid, 0) == 0 }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal_all(libc::SIGKILL);
    }
}

/// How a process says it is ready.
#[derive(Clone, Copy)]
pub(crate) enum Probe<'a> {
    /// `GET path` answers 2xx.
    Path(&'a str),
    /// A proxy of unknown kind: `/health`, else `/healthcheck` (vLLM's toy proxy), else it
    /// accepts connections and answers HTTP at all. A 5xx on either path means not yet.
    Proxy,
}

async fn probe(client: &reqwest::Client, url: &str, how: Probe<'_>) -> Result<(), String> {
    let paths: &[&str] = match how {
        Probe::Path(p) => &[p],
        Probe::Proxy => &["/health", "/healthcheck"],
    };
    for path in paths {
        match client.get(format!("{url}{path}")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status().is_server_error() || matches!(how, Probe::Path(_)) => {
                return Err(format!("{url}{path} answered {}", r.status()))
            }
            Ok(_) => continue,
            Err(e) => return Err(format!("{url}{path}: {e}")),
        }
    }
    // Listening and answering HTTP, with neither health path: ready as far as we can tell.
    Ok(())
}

/// Waits until every URL passes `how`, failing fast if a member dies.
/// The health checks' client: over https with the launch file's `tls:` (its CA and client
/// certificate).
pub(crate) fn health_client(plan: &Plan) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(2));
    if let Some(tls) = &plan.tls {
        b = b.use_preconfigured_tls((*tls.client().client_config().context("tls:")?).clone());
    }
    Ok(b.build()?)
}

pub(crate) async fn wait_healthy(
    group: &mut Group,
    client: &reqwest::Client,
    targets: &[(String, String)],
    how: Probe<'_>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(targets.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} waiting for {msg} [{bar:20}] {pos}/{len} healthy, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut pending: Vec<&(String, String)> = targets.iter().collect();
    let mut last_err: std::collections::HashMap<String, String> = Default::default();
    loop {
        if let Some((name, status, log)) = group.exited() {
            bar.abandon();
            bail!("{name} exited ({status}) before everything was healthy; last lines of {}:\n{}", log.display(), tail(&log, 20));
        }
        let checks =
            futures_util::future::join_all(pending.iter().map(|(name, url)| async move { (name.clone(), probe(client, url, how).await) }))
                .await;
        for (name, r) in checks {
            match r {
                Ok(()) => {
                    pending.retain(|(n, _)| *n != name);
                    bar.inc(1);
                    bar.println(format!("{name} healthy after {:.1}s", start.elapsed().as_secs_f64()));
                    if bar.is_hidden() {
                        eprintln!("{name} healthy after {:.1}s", start.elapsed().as_secs_f64());
                    }
                }
                Err(e) => {
                    last_err.insert(name, e);
                }
            }
        }
        if pending.is_empty() {
            bar.finish_and_clear();
            return Ok(());
        }
        bar.set_message(pending.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "));
        if start.elapsed() > timeout {
            bar.abandon();
            let detail: Vec<String> =
                pending.iter().map(|(n, _)| format!("{n}: {}", last_err.get(n).map_or("no answer", String::as_str))).collect();
            bail!("not healthy after {}s (timeout): {}", timeout.as_secs(), detail.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs this node's share of `plan` (all of it when `node` is None) until stopped.
pub(crate) async fn run(plan: &Plan, node: Option<usize>) -> anyhow::Result<()> {
    // Installed now: a SIGTERM that comes right after "ready" still stops everything.
    let stop = crate::signal::shutdown();
    let logs = plan.working_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mine: Vec<_> = plan.instances.iter().filter(|i| node.is_none_or(|n| i.node == n)).collect();
    let runs_router = node.is_none_or(|n| n == 0);
    let mut group = Group::default();
    let result = async {
        for i in &mine {
            group.spawn(&i.name, &i.argv, &i.env, &plan.log_path(&i.name))?;
        }
        println!("disagg launch: started {} instance(s); logs in {}", mine.len(), logs.display());
        // The router's node waits for every node's servers; other nodes for their own.
        let targets: Vec<(String, String)> = plan
            .instances
            .iter()
            .filter(|i| runs_router || node.is_none_or(|n| i.node == n))
            .filter_map(|i| i.url().map(|u| (i.name.clone(), u)))
            .collect();
        let client = health_client(plan)?;
        wait_healthy(&mut group, &client, &targets, Probe::Path("/health"), plan.timeout).await?;
        if let (true, Some(router)) = (runs_router, &plan.router) {
            group.spawn("router", &router.argv, &router.env, &plan.log_path("router"))?;
            let url = super::plan::url(router.scheme, &router.host, router.port);
            let how = match (&router.health_path, router.ours) {
                (Some(p), _) => Probe::Path(p),
                (None, true) => Probe::Path("/health"),
                (None, false) => Probe::Proxy,
            };
            wait_healthy(&mut group, &client, &[("router".to_string(), url.clone())], how, plan.timeout).await?;
            println!("disagg launch ready: {url}");
        } else {
            println!("disagg launch ready: node {} ({} instances healthy)", node.unwrap_or(0), mine.len());
        }
        let mut stop = std::pin::pin!(stop);
        let exited = tokio::select! {
            _ = &mut stop => None,
            e = async {
                loop {
                    if let Some(e) = group.exited() {
                        return e;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } => Some(e),
        };
        let Some((name, status, log)) = exited else {
            eprintln!("stopping every instance ...");
            return Ok(());
        };
        // A scheduler's cancel (scancel, a job's end) signals the whole step at once: an
        // instance killed by that SIGTERM may be seen before the launcher's own signal is.
        let terminated = std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGTERM);
        if terminated && tokio::time::timeout(SIGNAL_SKEW, &mut stop).await.is_ok() {
            eprintln!("stopping every instance ...");
            return Ok(());
        }
        Err(anyhow::anyhow!("{name} exited ({status}); stopping everything. Last lines of {}:\n{}", log.display(), tail(&log, 20)))
    }
    .await;
    group.stop().await;
    result
}
