//! `disagg launch --ray ADDRESS`: the plan on an existing Ray cluster, through a small
//! driver (ray_driver.py, embedded) that uses Ray's public API: a placement group per
//! replica, one actor per instance running it where Ray placed it, the first prefill's
//! node as {KV_IP}, the router on the head node. The driver reports JSON events; this side
//! shows them and forwards Ctrl-C / SIGTERM.

use std::process::Stdio;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::local::tail;
use super::plan::Plan;

const DRIVER: &str = include_str!("ray_driver.py");

pub(crate) async fn run(plan: &Plan, address: &str, python: &str) -> anyhow::Result<()> {
    if plan.instances.iter().any(|i| i.port.is_none()) || plan.nodes.len() > 1 {
        bail!("--ray places every replica itself: leave out `nodes`, and multi-node replicas (one replica over several nodes) are not supported on Ray");
    }
    let logs = plan.working_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let logs = std::fs::canonicalize(&logs)?;
    let job = format!("disagg-{}", std::process::id());
    let instances: Vec<Value> = plan
        .instances
        .iter()
        .map(|i| {
            let env: serde_json::Map<String, Value> = i.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({"name": i.name, "role": i.role.as_str(), "num_gpus": i.gpus.len(), "port": i.port, "argv": i.argv, "env": env})
        })
        .collect();
    let router = plan.router.as_ref().context("a YAML plan has a router")?;
    let router = if router.ours {
        // The URLs are known only once Ray has placed the instances: the driver puts each
        // worker's URL in by instance name.
        let workers: Vec<Value> =
            router.workers.iter().map(|w| json!({"flag": w.flag, "instance": w.instance, "bootstrap": w.bootstrap})).collect();
        json!({"command": null, "port": router.port, "base": router.base, "workers": workers, "tail": router.tail})
    } else {
        json!({"command": router.argv.iter().map(|a| shlex::try_quote(a).map(|c| c.into_owned()).unwrap_or_default()).collect::<Vec<_>>().join(" "), "port": router.port})
    };
    let doc = json!({"job": job, "timeout": plan.timeout.as_secs(), "gpus_per_worker": plan.gpus_per_worker, "log_dir": logs, "instances": instances, "router": router});
    let plan_file = logs.join("ray-plan.json");
    std::fs::write(&plan_file, serde_json::to_string_pretty(&doc)?)?;
    let driver_file = logs.join("ray_driver.py");
    std::fs::write(&driver_file, DRIVER)?;
    let mut child = tokio::process::Command::new(python)
        .arg("-u")
        .arg(&driver_file)
        .arg(&plan_file)
        .arg(address)
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("ray-driver.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {python} (the Python with the `ray` package; see --ray-python)"))?;
    let pid = child.id().context("the Ray driver has no pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("no driver stdout")?).lines();
    println!("disagg launch: on Ray at {address}; logs in {}", logs.display());
    let mut failure: Option<String> = None;
    let stop = crate::signal::shutdown();
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { break };
                let Ok(ev) = serde_json::from_str::<Value>(&line) else { eprintln!("{line}"); continue };
                match ev["event"].as_str().unwrap_or("") {
                    "instance" => eprintln!("{} ({}) placed on {}: {}, GPUs [{}]", ev["name"].as_str().unwrap_or("?"), ev["role"].as_str().unwrap_or("?"), ev["host"].as_str().unwrap_or("?"), ev["url"].as_str().unwrap_or("?"),
                        ev["gpus"].as_array().map(|g| g.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(",")).unwrap_or_default()),
                    "healthy" => eprintln!("{} healthy", ev["name"].as_str().unwrap_or("?")),
                    "ready" => println!("disagg launch ready: {}", ev["url"].as_str().unwrap_or("?")),
                    "failed" => {
                        let name = ev["name"].as_str().unwrap_or("?").to_string();
                        failure = Some(format!("{name} exited ({}); last lines of its log:\n{}", ev["status"], tail(&logs.join(format!("{name}.log")), 20)));
                    }
                    "timeout" => failure = Some(format!("not healthy after {}s (timeout): {}", plan.timeout.as_secs(), ev["pending"])),
                    "stopped" => eprintln!("every instance stopped"),
                    _ => eprintln!("{line}"),
                }
            }
            () = &mut stop, if !stopping => {
                stopping = true;
                eprintln!("stopping every instance ...");
                unsafe { libc::kill(pid as i32, libc::SIGTERM); }
            }
        }
    }
    let status = child.wait().await?;
    if let Some(f) = failure {
        bail!("{f}");
    }
    if !status.success() && !stopping {
        bail!(
            "the Ray driver failed ({status}); see {}:\n{}",
            logs.join("ray-driver.log").display(),
            tail(&logs.join("ray-driver.log"), 20)
        );
    }
    Ok(())
}
