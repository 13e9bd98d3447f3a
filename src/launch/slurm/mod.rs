//! `disagg launch` inside a Slurm allocation: the nodes from `SLURM_STEP_NODELIST` (the
//! job's list outside a step), their addresses from `scontrol show node` (NodeAddr, else
//! the name resolved), this node's rank from `SLURM_NODEID`, the GPUs from what Slurm
//! assigned (`SLURM_GPUS_ON_NODE`, `CUDA_VISIBLE_DEVICES`); a node's share that fails
//! cancels the whole step (`scancel JOB.STEP`), so every node's children stop.

pub mod hostlist;
pub(crate) mod sbatch;

use std::collections::HashMap;
use std::net::ToSocketAddrs as _;
use std::os::unix::process::ExitStatusExt as _;

use anyhow::{bail, Context};

use crate::launch::spec::config::{LaunchFile, NodeFile};

/// One node of the allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlurmNode {
    pub(crate) name: String,
    /// Slurm's NodeAddr for it, else its name resolved.
    pub(crate) address: String,
}

/// Where in Slurm this launcher runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    /// A task of a job step (`srun`): it runs node `node_id`'s share.
    Step { job: String, step: String, node_id: usize },
    /// The batch script or an `salloc` shell: nothing runs here but a dry run.
    Allocation { job: String },
}

/// GPUs Slurm assigned on this node (none on a cluster without GPU gres).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssignedGpus {
    pub(crate) count: u32,
    /// `CUDA_VISIBLE_DEVICES` as Slurm set it: the plan's device i is `devices[i]`.
    pub(crate) devices: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Allocation {
    pub(crate) place: Place,
    pub(crate) nodes: Vec<SlurmNode>,
    pub(crate) gpus: Option<AssignedGpus>,
}

/// The Slurm variables read, for tests to pass their own.
pub(crate) type Env = HashMap<String, String>;

pub(crate) fn process_env() -> Env {
    std::env::vars().filter(|(k, _)| k.starts_with("SLURM_") || k == "CUDA_VISIBLE_DEVICES").collect()
}

impl Allocation {
    /// None outside Slurm.
    pub(crate) fn detect(env: &Env) -> anyhow::Result<Option<Allocation>> {
        let Some(job) = env.get("SLURM_JOB_ID").cloned() else { return Ok(None) };
        let (place, list) = match (env.get("SLURM_STEP_ID"), env.get("SLURM_STEP_NODELIST")) {
            (Some(step), Some(list)) => {
                let node_id = env.get("SLURM_NODEID").context("SLURM_NODEID is not set in a Slurm step")?;
                let node_id = node_id.parse().with_context(|| format!("SLURM_NODEID `{node_id}`"))?;
                if let Some(tasks) = env.get("SLURM_STEP_NUM_TASKS").or(env.get("SLURM_NTASKS")) {
                    let nodes = env.get("SLURM_STEP_NUM_NODES").or(env.get("SLURM_NNODES"));
                    if nodes.is_some_and(|n| n != tasks) {
                        bail!(
                            "this Slurm step runs {tasks} tasks on {} nodes; `disagg launch` is one task per node: srun --ntasks-per-node=1",
                            nodes.map_or("?", String::as_str)
                        );
                    }
                }
                (Place::Step { job, step: step.clone(), node_id }, list.clone())
            }
            _ => (Place::Allocation { job }, env.get("SLURM_JOB_NODELIST").context("SLURM_JOB_NODELIST is not set")?.clone()),
        };
        let names = hostlist::expand(&list)?;
        let nodes = addresses(&names)?;
        if let Place::Step { node_id, .. } = place {
            if node_id >= nodes.len() {
                bail!("SLURM_NODEID {node_id} is not below the step's {} nodes ({list})", nodes.len());
            }
        }
        Ok(Some(Allocation { place, nodes, gpus: assigned_gpus(env)? }))
    }

    pub(crate) fn job(&self) -> &str {
        match &self.place {
            Place::Step { job, .. } | Place::Allocation { job } => job,
        }
    }

    pub(crate) fn describe(&self) -> String {
        let names: Vec<String> = self.nodes.iter().map(|n| format!("{} ({})", n.name, n.address)).collect();
        format!("Slurm nodes {}", names.join(", "))
    }

    /// The file placed on this allocation: its `nodes` (a file's own must be the same
    /// nodes, by name or address; their order is the file's) and its GPUs per node.
    /// Returns this node's rank in the plan when in a step.
    pub(crate) fn apply(&self, file: &mut LaunchFile, name: &str) -> anyhow::Result<Option<usize>> {
        let mine = match &self.place {
            Place::Step { node_id, .. } => Some(*node_id),
            Place::Allocation { .. } => None,
        };
        let rank = if file.nodes.is_empty() {
            file.nodes = self.nodes.iter().map(|n| NodeFile::Address(n.address.clone())).collect();
            mine
        } else {
            let listed: Vec<&str> = file.nodes.iter().map(NodeFile::address).collect();
            let same = |f: &str, s: &SlurmNode| f == s.name || f == s.address;
            let agree = listed.len() == self.nodes.len() && listed.iter().all(|f| self.nodes.iter().any(|s| same(f, s)));
            if !agree {
                bail!(
                    "{name} lists nodes [{}], but {}: drop `nodes` to take Slurm's, or ask Slurm for these (--nodelist)",
                    listed.join(", "),
                    self.describe()
                );
            }
            let rank = mine.map(|id| listed.iter().position(|f| same(f, &self.nodes[id])).expect("agreeing lists hold every node"));
            // Named by Slurm's names or addresses, placed on the addresses.
            for node in &mut file.nodes {
                let slurm = self.nodes.iter().find(|s| same(node.address(), s)).expect("agreeing lists hold every node");
                node.set_address(slurm.address.clone());
            }
            rank
        };
        if let Some(gpus) = &self.gpus {
            match file.gpus_per_node {
                Some(g) if g != gpus.count => bail!(
                    "{name}: gpus_per_node is {g}, but Slurm assigned {} GPU(s) on each node: make them agree (--gpus-per-node)",
                    gpus.count
                ),
                _ => {}
            }
            let all = gpus.count * self.nodes.len() as u32;
            if file.num_gpus > all {
                bail!(
                    "{name}: num_gpus is {}, but Slurm assigned {} GPU(s) on each of {} nodes ({all})",
                    file.num_gpus,
                    gpus.count,
                    self.nodes.len()
                );
            }
            // The allocation is the cluster: its GPUs, whatever part of them the plan uses.
            file.gpus_per_node = Some(gpus.count);
            file.num_gpus = all;
        }
        Ok(rank)
    }

    /// This node's device ids for the plan's indices (Slurm's CUDA_VISIBLE_DEVICES).
    pub(crate) fn device(&self, index: u32) -> Option<&str> {
        self.gpus.as_ref().and_then(|g| g.devices.get(index as usize)).map(String::as_str)
    }

    /// Cancels this step (every node's task gets SIGTERM, and stops its children): what a
    /// node whose share failed does, so the step fails as a whole.
    pub(crate) fn cancel_step(&self) {
        if let Place::Step { job, step, .. } = &self.place {
            let id = format!("{job}.{step}");
            match std::process::Command::new("scancel").args(["--signal=TERM", &id]).status() {
                // scancel is in the step too: the SIGTERM it sends reaches it as well.
                Ok(s) if s.success() || s.signal() == Some(libc::SIGTERM) => eprintln!("disagg launch: cancelled Slurm step {id}"),
                Ok(s) => eprintln!("disagg launch: scancel {id} failed ({s})"),
                Err(e) => eprintln!("disagg launch: cannot run scancel {id}: {e}"),
            }
        }
    }
}

fn assigned_gpus(env: &Env) -> anyhow::Result<Option<AssignedGpus>> {
    let devices: Vec<String> = env
        .get("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').map(str::trim).filter(|d| !d.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let count = match env.get("SLURM_GPUS_ON_NODE") {
        Some(n) => n.parse::<u32>().with_context(|| format!("SLURM_GPUS_ON_NODE `{n}`"))?,
        None => devices.len() as u32,
    };
    if count == 0 {
        return Ok(None);
    }
    if !devices.is_empty() && devices.len() as u32 != count {
        bail!("SLURM_GPUS_ON_NODE is {count} but CUDA_VISIBLE_DEVICES lists {} devices", devices.len());
    }
    Ok(Some(AssignedGpus { count, devices }))
}

/// Each node's address: `scontrol show node`'s NodeAddr, else the name resolved.
fn addresses(names: &[String]) -> anyhow::Result<Vec<SlurmNode>> {
    let mut from_slurm: HashMap<String, String> = HashMap::new();
    if let Ok(out) = std::process::Command::new("scontrol").args(["show", "-o", "node", &names.join(",")]).output() {
        from_slurm = node_addresses(&String::from_utf8_lossy(&out.stdout));
    }
    names
        .iter()
        .map(|name| {
            let address = match from_slurm.get(name) {
                Some(a) => a.clone(),
                None => (name.as_str(), 0)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .map(|a| a.ip().to_string())
                    .with_context(|| format!("Slurm node {name}: scontrol gives no NodeAddr and the name does not resolve"))?,
            };
            Ok(SlurmNode { name: name.clone(), address })
        })
        .collect()
}

/// NodeName → NodeAddr from `scontrol show -o node` (one node per line).
fn node_addresses(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let field = |key: &str| line.split_whitespace().find_map(|t| t.strip_prefix(key)).map(String::from);
            Some((field("NodeName=")?, field("NodeAddr=")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_node_addresses_as_scontrol_prints_them() {
        let text = "NodeName=n1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 NodeAddr=127.0.0.1 NodeHostName=vm Port=17801 OS=Linux 6.1 #1\n\
                    NodeName=n2 Arch=x86_64 NodeAddr=10.0.0.2 NodeHostName=vm\n";
        let m = node_addresses(text);
        assert_eq!(m["n1"], "127.0.0.1");
        assert_eq!(m["n2"], "10.0.0.2");
    }

    #[test]
    fn outside_slurm_nothing_and_a_step_needs_one_task_per_node() {
        assert!(Allocation::detect(&env(&[])).unwrap().is_none());
        let two_per_node = env(&[
            ("SLURM_JOB_ID", "7"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NODELIST", "localhost"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_STEP_NUM_NODES", "1"),
        ]);
        let err = Allocation::detect(&two_per_node).unwrap_err().to_string();
        assert!(err.contains("--ntasks-per-node=1"), "{err}");
    }

    #[test]
    fn gpus_slurm_assigned_map_the_plans_devices() {
        let g = assigned_gpus(&env(&[("SLURM_GPUS_ON_NODE", "4"), ("CUDA_VISIBLE_DEVICES", "4,5,6,7")])).unwrap().unwrap();
        assert_eq!(g.count, 4);
        assert_eq!(g.devices[2], "6");
        assert!(assigned_gpus(&env(&[("SLURM_GPUS_ON_NODE", "0")])).unwrap().is_none());
        assert!(assigned_gpus(&env(&[])).unwrap().is_none());
        assert!(assigned_gpus(&env(&[("SLURM_GPUS_ON_NODE", "2"), ("CUDA_VISIBLE_DEVICES", "0")])).is_err());
    }
}
