//! vLLM's three data-parallel load-balancing layouts of one replica, by vLLM's own rules
//! (vllm/engine/arg_utils.py, vllm/entrypoints/cli/serve.py):
//! - internal: one API server on the replica's first node for every rank; the other nodes
//!   run `--headless` with their `--data-parallel-start-rank`.
//! - hybrid (`--data-parallel-hybrid-lb`): an API server on every node for its local
//!   ranks; the router lists every node with its local rank count.
//! - external: an API server per rank (`--data-parallel-rank`).

use crate::launch::spec::config::DpMode;

/// Which replica of its role a process belongs to, and which of the replica's processes it
/// is (0: the DP master, the API server of an internal-LB replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplicaPart {
    pub(crate) replica: usize,
    pub(crate) part: usize,
    pub(crate) processes: usize,
}

/// One process of a replica: where it runs, its GPUs and the DP ranks behind it.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(crate) node: usize,
    pub(crate) gpus: Vec<u32>,
    /// The replica's n-th node (0 = the DP master).
    pub(crate) part: usize,
    /// The node of the replica's first process (its DP master, and the API server of an
    /// internal-LB replica).
    pub(crate) first_node: usize,
    pub(crate) rank_start: u32,
    /// Ranks this process runs (`--data-parallel-size-local`).
    pub(crate) ranks: u32,
    /// No API server (internal layout, not the first node).
    pub(crate) headless: bool,
    /// External layout: the one rank it serves.
    pub(crate) rank: Option<u32>,
}

impl Slot {
    /// DP ranks reached through this process's API server.
    pub(crate) fn served_ranks(&self, layout: DpMode, dp: u32) -> u32 {
        match (self.headless, layout) {
            (true, _) => 0,
            (false, DpMode::Internal) => dp,
            (false, _) => self.ranks,
        }
    }

    pub(crate) fn describe(&self, layout: DpMode, dp: u32) -> Option<String> {
        if dp == 1 {
            return None;
        }
        let last = self.rank_start + self.ranks - 1;
        Some(match (layout, self.headless) {
            (DpMode::External, _) => format!("DP rank {} of {dp}, external LB (own API server)", self.rank_start),
            (DpMode::Hybrid, _) => format!("DP {dp}, ranks {}-{last}, hybrid LB (API server for its ranks)", self.rank_start),
            (DpMode::Internal, true) => {
                format!("DP {dp}, ranks {}-{last}, headless (served by node {}'s API server)", self.rank_start, self.first_node)
            }
            (DpMode::Internal, false) => format!("DP {dp}, ranks {}-{last}, internal LB (API server for all {dp} ranks)", self.rank_start),
        })
    }
}

/// The processes of one replica placed on `parts` (node, GPUs), in node order.
pub(super) fn slots(layout: DpMode, dp: u32, parts: &[(usize, Vec<u32>)]) -> Vec<Slot> {
    let per_node = dp / parts.len() as u32;
    let first_node = parts[0].0;
    let mut out = Vec::new();
    for (j, (node, gpus)) in parts.iter().enumerate() {
        let first = j as u32 * per_node;
        if layout == DpMode::External && dp > 1 {
            let per_rank = gpus.len() / per_node as usize;
            for k in 0..per_node {
                let g = gpus[k as usize * per_rank..(k as usize + 1) * per_rank].to_vec();
                out.push(Slot {
                    node: *node,
                    gpus: g,
                    part: j,
                    first_node,
                    rank_start: first + k,
                    ranks: 1,
                    headless: false,
                    rank: Some(first + k),
                });
            }
        } else {
            let headless = layout == DpMode::Internal && j > 0;
            out.push(Slot {
                node: *node,
                gpus: gpus.clone(),
                part: j,
                first_node,
                rank_start: first,
                ranks: per_node,
                headless,
                rank: None,
            });
        }
    }
    out
}

/// A flag the plan sets: vLLM's dest name (underscores) and its value (None: a switch).
pub(super) type Flag = (String, Option<String>);

fn flag(k: &str, v: impl ToString) -> Flag {
    (k.to_string(), Some(v.to_string()))
}

/// The DP flags of one process, as the guides write them.
pub(super) fn flags(layout: DpMode, dp: u32, replica_nodes: usize, slot: &Slot, master: &str, rpc_port: u16) -> Vec<Flag> {
    if dp == 1 {
        return Vec::new();
    }
    if let Some(r) = slot.rank {
        return vec![
            flag("data_parallel_size", dp),
            flag("data_parallel_rank", r),
            flag("data_parallel_address", master),
            flag("data_parallel_rpc_port", rpc_port),
        ];
    }
    let mut out = vec![flag("data_parallel_size", dp), flag("data_parallel_size_local", slot.ranks)];
    if replica_nodes == 1 {
        return out;
    }
    if layout == DpMode::Hybrid {
        out.push(("data_parallel_hybrid_lb".into(), None));
    }
    if slot.part > 0 {
        out.push(flag("data_parallel_start_rank", slot.rank_start));
    }
    out.extend([flag("data_parallel_address", master), flag("data_parallel_rpc_port", rpc_port)]);
    if slot.headless {
        out.push(("headless".into(), None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(f: &[Flag]) -> Vec<String> {
        f.iter().map(|(k, v)| v.as_ref().map_or(k.clone(), |v| format!("{k}={v}"))).collect()
    }

    #[test]
    fn each_layout_gives_what_vllm_accepts_per_node() {
        let parts = vec![(2, vec![0, 1, 2, 3]), (3, vec![0, 1, 2, 3])];
        // Internal: the first node serves all 8 ranks, the second is headless from rank 4.
        let s = slots(DpMode::Internal, 8, &parts);
        assert_eq!((s.len(), s[0].served_ranks(DpMode::Internal, 8), s[1].served_ranks(DpMode::Internal, 8)), (2, 8, 0));
        assert!(s[1].describe(DpMode::Internal, 8).unwrap().ends_with("headless (served by node 2's API server)"));
        assert_eq!(
            names(&flags(DpMode::Internal, 8, 2, &s[1], "m", 7)),
            [
                "data_parallel_size=8",
                "data_parallel_size_local=4",
                "data_parallel_start_rank=4",
                "data_parallel_address=m",
                "data_parallel_rpc_port=7",
                "headless"
            ]
        );
        assert!(!names(&flags(DpMode::Internal, 8, 2, &s[0], "m", 7)).iter().any(|f| f.contains("start_rank") || f == "headless"));
        // Hybrid: both nodes serve their 4 ranks; never headless.
        let s = slots(DpMode::Hybrid, 8, &parts);
        assert_eq!((s[0].served_ranks(DpMode::Hybrid, 8), s[1].served_ranks(DpMode::Hybrid, 8)), (4, 4));
        assert_eq!(
            names(&flags(DpMode::Hybrid, 8, 2, &s[1], "m", 7)),
            [
                "data_parallel_size=8",
                "data_parallel_size_local=4",
                "data_parallel_hybrid_lb",
                "data_parallel_start_rank=4",
                "data_parallel_address=m",
                "data_parallel_rpc_port=7"
            ]
        );
        // External: a process per rank, each with a quarter of its node's GPUs.
        let s = slots(DpMode::External, 8, &parts);
        assert_eq!(s.len(), 8);
        assert_eq!((s[5].node, s[5].gpus.clone(), s[5].rank), (3, vec![1], Some(5)));
        assert_eq!(
            names(&flags(DpMode::External, 8, 2, &s[5], "m", 7)),
            ["data_parallel_size=8", "data_parallel_rank=5", "data_parallel_address=m", "data_parallel_rpc_port=7"]
        );
        // One node, DP 2: the ranks are local.
        let one = slots(DpMode::Internal, 2, &[(0, vec![])]);
        assert_eq!(names(&flags(DpMode::Internal, 2, 1, &one[0], "m", 7)), ["data_parallel_size=2", "data_parallel_size_local=2"]);
    }
}
