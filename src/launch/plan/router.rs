//! The router of a plan: `disagg route` with every API server's URL and the DP ranks
//! behind it, or a pdjob `scheduler.command` with its placeholders filled in.

use std::path::Path;

use super::{ConfigError, Ctx, Instance, Role, RouterPlan, RouterWorker};
use crate::launch::spec::config::LaunchFile;
use crate::launch::spec::connector::{self as launch_connector, Connector};

/// Where the router listens, and for P2pNccl the discovery address engines ping.
pub(super) struct Address {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) p2p_proxy: Option<(String, u16)>,
}

pub(super) fn address(f: &LaunchFile, cx: &Ctx<'_>, nodes: &[String], flow: Option<Connector>) -> Result<Address, ConfigError> {
    let port = f.scheduler.port.unwrap_or(8021);
    let host = f.scheduler.host.clone().unwrap_or_else(|| nodes[0].clone());
    let p2p_proxy = match flow {
        Some(Connector::P2pNccl) => {
            let reachable = if host == "0.0.0.0" || host == "::" { nodes[0].clone() } else { host.clone() };
            Some((reachable, launch_connector::discovery_port(port).map_err(|e| cx.err("scheduler.port", e))?))
        }
        _ => None,
    };
    Ok(Address { host, port, p2p_proxy })
}

pub(super) fn plan(
    f: &LaunchFile,
    cx: &Ctx<'_>,
    exe: &Path,
    nodes: &[String],
    flow: Option<Connector>,
    instances: &[Instance],
    at: &Address,
) -> Result<RouterPlan, ConfigError> {
    let served: Vec<&Instance> = instances.iter().filter(|i| i.port.is_some()).collect();
    let urls = |r: Role| served.iter().filter(|i| i.role == r).map(|i| i.url().expect("serves HTTP")).collect::<Vec<_>>();
    if let Some(cmd) = &f.scheduler.command {
        let cmd = substitute(cmd, at.port, &urls(Role::Prefill), &urls(Role::Decode));
        if let Some(left) = unfilled_url_placeholder(&cmd) {
            return Err(cx.err(
                "scheduler.command",
                format!(
                    "{left} has no value: the plan has {} prefill and {} decode API server(s)",
                    urls(Role::Prefill).len(),
                    urls(Role::Decode).len()
                ),
            ));
        }
        let mut argv =
            shlex::split(&cmd).filter(|w| !w.is_empty()).ok_or_else(|| cx.err("scheduler.command", "is not a valid command line"))?;
        // `disagg` in the proxy command is this very binary, on PATH or not.
        if argv[0] == "disagg" {
            argv[0] = exe.display().to_string();
        }
        return Ok(RouterPlan {
            host: nodes[0].clone(),
            port: at.port,
            scheme: super::Scheme::Http,
            argv,
            env: Vec::new(),
            ours: false,
            health_path: f.scheduler.health_path.clone(),
            base: Vec::new(),
            workers: Vec::new(),
            tail: Vec::new(),
        });
    }
    let mut base = vec![
        exe.display().to_string(),
        "route".into(),
        "--host".into(),
        at.host.clone(),
        "--port".into(),
        at.port.to_string(),
        "--vllm-pd-disaggregation".into(),
    ];
    let mut workers = Vec::new();
    match flow {
        // The engines register themselves at the discovery address.
        Some(Connector::P2pNccl) => {
            let (_, dport) = at.p2p_proxy.as_ref().expect("set for P2pNccl");
            base.extend(["--vllm-discovery-address".into(), crate::api::join_host_port(&at.host, *dport)]);
        }
        _ => {
            if flow == Some(Connector::Mooncake) {
                base.extend(["--kv-connector".into(), "mooncake".into()]);
            }
            for i in served.iter().filter(|i| i.elastic) {
                workers.push(RouterWorker { flag: "--pd-pool", instance: i.name.clone(), bootstrap: None });
            }
            for i in served.iter().filter(|i| i.role == Role::Prefill && !i.elastic) {
                let bootstrap = (flow == Some(Connector::Mooncake)).then_some(i.side_channel_port);
                workers.push(RouterWorker { flag: "--prefill", instance: i.name.clone(), bootstrap });
            }
            for i in served.iter().filter(|i| i.role == Role::Decode && !i.elastic) {
                workers.push(RouterWorker { flag: "--decode", instance: i.name.clone(), bootstrap: None });
            }
        }
    }
    let mut tail = rank_flags(cx, &served)?;
    if let Some(tls) = &f.tls {
        tail.extend(tls.router_flags());
    }
    tail.extend(f.scheduler.args.iter().cloned());
    let mut argv = base.clone();
    for w in &workers {
        let i = served.iter().find(|i| i.name == w.instance).expect("a served instance");
        argv.extend([w.flag.to_string(), i.url().expect("serves HTTP")].into_iter().chain(w.bootstrap.map(|p| p.to_string())));
    }
    argv.extend(tail.iter().cloned());
    let scheme = if f.tls.is_some() { super::Scheme::Https } else { super::Scheme::Http };
    Ok(RouterPlan {
        host: at.host.clone(),
        port: at.port,
        scheme,
        argv,
        env: Vec::new(),
        ours: true,
        health_path: None,
        base,
        workers,
        tail,
    })
}

/// The DP ranks behind each URL, as vllm-router's flags say them: one count for every
/// URL (`--intra-node-data-parallel-size`), or one per role.
fn rank_flags(cx: &Ctx<'_>, served: &[&Instance]) -> Result<Vec<String>, ConfigError> {
    let per_role = |r: Role| -> Result<u32, ConfigError> {
        let mut counts: Vec<u32> = served.iter().filter(|i| i.role == r).map(|i| i.ranks).collect();
        counts.dedup();
        match counts.as_slice() {
            [] => Ok(1),
            [one] => Ok(*one),
            _ => Err(cx.err(
                &format!("{}.data_parallel_size", r.as_str()),
                "the role's API servers front different numbers of DP ranks, which the router's flags cannot say",
            )),
        }
    };
    let (p, d) = (per_role(Role::Prefill)?, per_role(Role::Decode)?);
    Ok(if p == d && p > 1 {
        vec!["--intra-node-data-parallel-size".into(), p.to_string()]
    } else if p != d {
        vec!["--prefill-dp-size".into(), p.to_string(), "--decode-dp-size".into(), d.to_string()]
    } else {
        Vec::new()
    })
}

/// pdjob's placeholders in `scheduler.command`, replaced highest index first so that
/// `$PREFILL_HOST_1` never eats the front of `$PREFILL_HOST_10`.
pub(crate) fn substitute(cmd: &str, port: u16, prefill: &[String], decode: &[String]) -> String {
    let mut out = cmd.replace("{PORT}", &port.to_string());
    for (name, urls) in [("PREFILL", prefill), ("DECODE", decode)] {
        for idx in (1..=urls.len()).rev() {
            let u = &urls[idx - 1];
            let hostport = u.trim_start_matches("http://");
            if let Some((h, p)) = hostport.rsplit_once(':') {
                for (k, v) in [("HOST", h), ("PORT", p)] {
                    out = out.replace(&format!("${{{name}_{k}_{idx}}}"), v).replace(&format!("${name}_{k}_{idx}"), v);
                }
            }
            out = out.replace(&format!("${{{name}_URL_{idx}}}"), u).replace(&format!("${name}_URL_{idx}"), u);
        }
    }
    out
}

/// A `$PREFILL_URL_3` (or HOST/PORT, DECODE, `${...}`) that no instance filled.
fn unfilled_url_placeholder(cmd: &str) -> Option<String> {
    for role in ["PREFILL", "DECODE"] {
        for kind in ["URL", "HOST", "PORT"] {
            for pre in ["$", "${"] {
                let needle = format!("{pre}{role}_{kind}_");
                if let Some(at) = cmd.find(&needle) {
                    let digits: String = cmd[at + needle.len()..].chars().take_while(char::is_ascii_digit).collect();
                    if !digits.is_empty() {
                        return Some(format!("{needle}{digits}{}", if pre == "${" { "}" } else { "" }));
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_highest_index_first_and_leftovers_found() {
        let p: Vec<String> = (1..=11).map(|i| format!("http://p{i}:81{i:02}")).collect();
        let out = substitute(
            "x --port {PORT} $PREFILL_HOST_1 $PREFILL_HOST_11 ${PREFILL_PORT_2} $PREFILL_URL_10 $DECODE_URL_1",
            9,
            &p,
            &["http://d:1".into()],
        );
        assert_eq!(out, "x --port 9 p1 p11 8102 http://p10:8110 http://d:1");
        assert_eq!(unfilled_url_placeholder(&out), None);
        let out = substitute("x $PREFILL_URL_1 ${DECODE_HOST_2}", 9, &p[..1], &["http://d:1".into()]);
        assert_eq!(unfilled_url_placeholder(&out).as_deref(), Some("${DECODE_HOST_2}"));
        assert_eq!(unfilled_url_placeholder("p $PREFILL_URL_3").as_deref(), Some("$PREFILL_URL_3"));
    }
}
