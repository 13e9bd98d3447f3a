//! A plan's processes as Kubernetes reaches them: each process is a pod of its replica's
//! object (a Deployment for a one-process replica, a LeaderWorkerSet for more), named
//! `<role>-<replica>`, found by DNS in the namespace. Every pod has an address of its own,
//! so every process of a replica listens on the replica's first process's ports.

use std::collections::HashMap;

use super::Instance;

/// The replica's object (and Service) name: `prefill-0`, `decode-1`.
pub(crate) fn group_name(i: &Instance) -> String {
    format!("{}-{}", i.role.as_str(), i.group.replica)
}

/// The process's DNS name in the namespace: the Service of a one-process replica, else the
/// LeaderWorkerSet's pod under its headless Service (leader `G-0`, worker k `G-0-k`).
pub(crate) fn dns_name(i: &Instance) -> String {
    let g = group_name(i);
    match (i.group.processes, i.group.part) {
        (1, _) => g,
        (_, 0) => format!("{g}-0.{g}"),
        (_, k) => format!("{g}-0-{k}.{g}"),
    }
}

/// Each instance's host becomes its DNS name and its ports its replica leader's, so the
/// router's worker list (built from them) reaches the pods.
pub(super) fn reach_by_dns(instances: &mut [Instance]) {
    let leaders: HashMap<String, (Option<u16>, u16)> =
        instances.iter().filter(|i| i.group.part == 0).map(|i| (group_name(i), (i.port, i.side_channel_port))).collect();
    for i in instances.iter_mut() {
        let (port, side) = leaders[&group_name(i)];
        i.host = dns_name(i);
        if i.port.is_some() {
            i.port = port.or(i.port);
        }
        i.side_channel_port = side;
    }
}
