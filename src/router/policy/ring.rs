//! A consistent-hash ring over every worker of the pool (160 virtual nodes each, placed by
//! URL). A key goes to the first usable worker clockwise from its hash, so a worker going
//! down, joining or leaving moves only the keys it owns, and they come back when it returns.

const VNODES: usize = 160;

use std::sync::Arc;

#[derive(Default)]
pub(crate) struct HashRing {
    points: Vec<(u64, Arc<str>)>,
}

fn hash(bytes: &[u8]) -> u64 {
    finish(crate::api::fnv1a(crate::api::FNV_OFFSET, bytes))
}

/// FNV-1a, then a finaliser for spread: stable across runs and platforms.
fn finish(h: u64) -> u64 {
    let h = h ^ (h >> 33);
    let h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A key's place on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingKey(u64);

impl HashRing {
    pub(crate) fn key(bytes: &[u8]) -> RingKey {
        RingKey(hash(bytes))
    }

    /// The key of bytes fed to FNV-1a by `feed` (from the offset basis it is given).
    pub(crate) fn key_of(feed: impl FnOnce(u64) -> u64) -> RingKey {
        RingKey(finish(feed(crate::api::FNV_OFFSET)))
    }

    pub(crate) fn add(&mut self, url: &str) {
        let id: Arc<str> = Arc::from(url);
        self.points.extend((0..VNODES).map(|v| (hash(format!("{url}#{v}").as_bytes()), id.clone())));
        self.points.sort_unstable();
    }

    pub(crate) fn remove(&mut self, url: &str) {
        self.points.retain(|(_, u)| &**u != url);
    }

    /// The owner of `key` among the workers `usable` accepts.
    pub(crate) fn lookup(&self, key: RingKey, usable: impl Fn(&str) -> bool) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let h = key.0;
        let start = self.points.partition_point(|(p, _)| *p < h);
        (0..self.points.len()).map(|k| &*self.points[(start + k) % self.points.len()].1).find(|w| usable(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_going_down_moves_only_its_keys() {
        let urls: Vec<String> = (0..4).map(|i| format!("http://w{i}:80")).collect();
        let mut ring = HashRing::default();
        urls.iter().for_each(|u| ring.add(u));
        let keys: Vec<String> = (0..2000).map(|i| format!("session-{i}")).collect();
        let owner = |ring: &HashRing, k: &str, down: &str| ring.lookup(HashRing::key(k.as_bytes()), |w| w != down).unwrap().to_string();
        let before: Vec<String> = keys.iter().map(|k| owner(&ring, k, "")).collect();
        let after: Vec<String> = keys.iter().map(|k| owner(&ring, k, &urls[2])).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != urls[2] {
                assert_eq!(a, b, "keys of live workers stay");
            } else {
                assert_ne!(*a, urls[2]);
            }
        }
        for u in &urls {
            assert!(before.iter().filter(|b| *b == u).count() > 300, "spread over {u}");
        }
        // Leaving is going down for good; joining takes keys only for the newcomer.
        ring.remove(&urls[2]);
        assert_eq!(keys.iter().map(|k| owner(&ring, k, "")).collect::<Vec<_>>(), after);
        ring.add("http://w9:80");
        for (k, a) in keys.iter().zip(&after) {
            let now = owner(&ring, k, "");
            assert!(now == *a || now == "http://w9:80", "{k}: {a} -> {now}");
        }
    }
}
