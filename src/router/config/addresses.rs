//! Worker and listener addresses as the command lines write them: vllm-router's URLs, the
//! toy proxy's zipped hosts and ports, the `host:port,port` shorthand, a bind address.

use crate::api::join_host_port;
use crate::router::workers::url::normalize_url;

/// `HOST:PORT` to bind (IPv6 as `[::1]:PORT`), checked.
pub(super) fn parse_bind_address(spec: &str) -> Result<String, String> {
    let (host, port) = spec
        .rsplit_once(':')
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| format!("--vllm-discovery-address `{spec}`: expected HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| format!("--vllm-discovery-address `{spec}`: bad port `{port}`"))?;
    Ok(join_host_port(host.trim_start_matches('[').trim_end_matches(']'), port))
}

pub(super) fn zip_hosts(hosts: &[String], ports: &[u16], what: &str) -> Result<Vec<String>, String> {
    if hosts.is_empty() && ports.is_empty() {
        return Ok(Vec::new());
    }
    if hosts.len() != ports.len() {
        return Err(format!(
            "--{what}-hosts has {} entries but --{what}-ports has {}: they are zipped, one host per port",
            hosts.len(),
            ports.len()
        ));
    }
    hosts.iter().zip(ports).map(|(h, p)| normalize_url(&join_host_port(h, *p))).collect()
}

/// `localhost:8300,8301,other:9000` -> three workers; a bare port reuses the last host.
pub(crate) fn parse_instances(spec: &str, flag: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut host: Option<String> = None;
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(port) = item.parse::<u16>() {
            let h = host.as_ref().ok_or_else(|| format!("--{flag} `{spec}`: port {port} comes before any host"))?;
            out.push(normalize_url(&join_host_port(h, port))?);
            continue;
        }
        let (h, p) = item
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("--{flag} `{spec}`: `{item}` is neither HOST:PORT nor PORT"))?;
        let port: u16 = p.parse().map_err(|_| format!("--{flag} `{spec}`: bad port `{p}`"))?;
        out.push(normalize_url(&join_host_port(h, port))?);
        host = Some(h.to_string());
    }
    if out.is_empty() {
        return Err(format!("--{flag} `{spec}` names no worker"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_shorthand_reuses_the_last_host() {
        assert_eq!(
            parse_instances("localhost:8300,8301,[::1]:9000,9001", "x").unwrap(),
            ["http://localhost:8300", "http://localhost:8301", "http://[::1]:9000", "http://[::1]:9001"]
        );
        assert!(parse_instances("8300", "x").is_err());
        assert!(parse_instances("h:notaport", "x").is_err());
    }

    #[test]
    fn toy_proxy_hosts_and_ports_zip() {
        let z = zip_hosts(&["a".into(), "::1".into()], &[1, 2], "prefiller").unwrap();
        assert_eq!(z, ["http://a:1", "http://[::1]:2"]);
        assert!(zip_hosts(&["a".into()], &[1, 2], "prefiller").unwrap_err().contains("zipped"));
    }
}
