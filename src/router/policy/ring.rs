//! A consistent-hash ring over every configured worker (160 virtual nodes each). A key
//! goes to the first healthy worker clockwise from its hash, so a worker going down moves
//! only the keys it owned, and they come back when it returns.

const VNODES: usize = 160;

pub struct HashRing {
    points: Vec<(u64, usize)>,
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a, then a finaliser for spread: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl HashRing {
    pub fn new(workers: &[String]) -> Self {
        let mut points: Vec<(u64, usize)> = workers
            .iter()
            .enumerate()
            .flat_map(|(i, url)| (0..VNODES).map(move |v| (hash(format!("{url}#{v}").as_bytes()), i)))
            .collect();
        points.sort_unstable();
        HashRing { points }
    }

    /// The owner of `key` among the workers `usable` accepts.
    pub fn lookup(&self, key: &[u8], usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key);
        let start = self.points.partition_point(|(p, _)| *p < h);
        (0..self.points.len()).map(|k| self.points[(start + k) % self.points.len()].1).find(|w| usable(*w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_going_down_moves_only_its_keys() {
        let urls: Vec<String> = (0..4).map(|i| format!("http://w{i}:80")).collect();
        let ring = HashRing::new(&urls);
        let keys: Vec<String> = (0..2000).map(|i| format!("session-{i}")).collect();
        let before: Vec<usize> = keys.iter().map(|k| ring.lookup(k.as_bytes(), |_| true).unwrap()).collect();
        let after: Vec<usize> = keys.iter().map(|k| ring.lookup(k.as_bytes(), |w| w != 2).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "keys of live workers stay");
            } else {
                assert_ne!(*a, 2);
            }
        }
        let mut counts = [0usize; 4];
        for b in &before {
            counts[*b] += 1;
        }
        assert!(counts.iter().all(|c| *c > 300), "spread: {counts:?}");
    }
}
