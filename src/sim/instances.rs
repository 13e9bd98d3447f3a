//! `--instances N`: N simulated engines in one process, for scale experiments. Instance i
//! is the engine that `disagg sim` with these flags would be, shifted: its HTTP port is
//! `--port` + i (0: a free port each), its side channels `--side-channel-port` + i × its
//! DP ranks, its Mooncake bootstrap port + i, its KV events' endpoints (and replay
//! endpoints) port + i × `--data-parallel-size` (vLLM then adds the rank within). Each has
//! its own KV caches, DP ranks, publishers, metrics and fault counters; they share the
//! runtime, the tokenizer and the TLS files.

use crate::api::connector::MOONCAKE_BOOTSTRAP_PORT;

use super::server::config::SimArgs;

impl SimArgs {
    /// What `--instances` cannot combine with, and ports that would run past 65535.
    pub(crate) fn check_instances(&self) -> Result<(), String> {
        let n = u32::from(self.instances);
        if n == 1 {
            return Ok(());
        }
        let multi_node = self.headless
            || self.data_parallel_hybrid_lb
            || self.data_parallel_address.is_some()
            || self.data_parallel_rank.is_some()
            || self.data_parallel_start_rank.is_some()
            || self.data_parallel_size_local.is_some();
        if multi_node {
            return Err("--instances runs whole replicas (all their DP ranks) in this process: \
                        multi-node DP flags (--headless, --data-parallel-address, -rank, -start-rank, \
                        -size-local, --data-parallel-hybrid-lb) take one instance"
                .into());
        }
        if self.crash_after_requests.is_some() || self.die_on_kv_mismatch {
            return Err("--crash-after-requests and --die-on-kv-mismatch end the whole process: \
                        with --instances, run the engine that should die as a process of its own"
                .into());
        }
        let dp = u32::from(self.data_parallel_size);
        let fits = |base: u32, step: u32, name: &str| {
            if base != 0 && base + (n - 1) * step + step - 1 > u32::from(u16::MAX) {
                return Err(format!("{name} {base} + {n} instances exceeds port 65535"));
            }
            Ok(())
        };
        fits(u32::from(self.port), 1, "--port")?;
        fits(self.side_channel_port.map_or(0, u32::from), dp, "--side-channel-port")?;
        fits(self.mooncake_bootstrap_port.map_or(0, u32::from), 1, "--mooncake-bootstrap-port")?;
        if let Some(cfg) = self.kv_events()? {
            for endpoint in std::iter::once(&cfg.endpoint).chain(cfg.replay_endpoint.as_ref()) {
                let port = endpoint.rsplit_once(':').and_then(|(_, p)| p.parse::<u32>().ok()).unwrap_or(0);
                fits(port, dp, "the KV events endpoint's port")?;
            }
        }
        Ok(())
    }

    /// Instance `i`'s flags (instance 0's are these).
    pub(crate) fn instance(&self, i: u16) -> SimArgs {
        let mut a = self.clone();
        a.instances = 1;
        let dp = self.data_parallel_size;
        if self.port != 0 {
            a.port = self.port + i;
        }
        a.side_channel_port = self.side_channel_port.map(|base| base + i * dp);
        a.mooncake_bootstrap_port = match self.mooncake_bootstrap_port {
            Some(0) => Some(0),
            Some(p) => Some(p + i),
            None => Some(MOONCAKE_BOOTSTRAP_PORT + i).filter(|_| self.kv_connector == super::Connector::Mooncake),
        };
        if let Ok(Some(cfg)) = self.kv_events() {
            // The endpoints moved as rank i × DP's would be (vLLM's own offset).
            let shifted = cfg.for_rank(usize::from(i) * usize::from(dp));
            a.kv_events_config = Some(serde_json::to_string(&shifted).expect("a config serialises"));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: super::SimArgs,
    }

    fn args(line: &str) -> super::SimArgs {
        Cli::try_parse_from(std::iter::once("sim").chain(line.split_whitespace())).unwrap().sim
    }

    #[test]
    fn instance_i_is_shifted_by_i_and_its_ranks() {
        let a = args(
            r#"--instances 3 --port 8100 --data-parallel-size 2 --side-channel-port 5600 --kv-events-config {"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:6557"}"#,
        );
        a.check_instances().unwrap();
        let two = a.instance(2);
        assert_eq!((two.port, two.side_channel_port, two.instances), (8102, Some(5604), 1));
        let events = two.kv_events().unwrap().unwrap();
        assert_eq!((events.endpoint.as_str(), events.replay_endpoint.as_deref()), ("tcp://*:5561", Some("tcp://*:6561")));
        let free = args("--instances 3 --port 0").instance(2);
        assert_eq!((free.port, free.side_channel_port), (0, None), "0 stays a free port");
    }

    #[test]
    fn what_instances_cannot_take_is_refused() {
        for bad in [
            "--instances 2 --headless --data-parallel-address 127.0.0.1",
            "--instances 2 --crash-after-requests 1",
            "--instances 9 --port 65530",
        ] {
            let e = args(bad).check_instances().unwrap_err();
            assert!(e.contains("--instances") || e.contains("65535"), "{bad}: {e}");
        }
        assert!(args("--instances 1 --crash-after-requests 1").check_instances().is_ok());
    }
}
