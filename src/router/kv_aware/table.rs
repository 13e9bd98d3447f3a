//! The KV index's maps: u64 keys to a small value, open addressing with linear probing,
//! one 16-byte slot per entry, at most half full. A lookup nearly always reads one cache
//! line, and that line can be fetched ahead (`prefetch`) before it is needed, so the
//! misses of a whole run of blocks overlap (hashbrown keeps its control bytes and its
//! entries apart: two lines, the second known only once the first has arrived). Slots
//! are placed by a per-process seeded hash of the key, so an engine cannot choose hashes
//! that pile into one run of slots.

/// An entry's place: its key and value side by side.
#[derive(Clone, Copy, Default)]
struct Slot<V> {
    /// 0: an empty slot (key 0's own value is kept apart, in `zero`).
    key: u64,
    val: V,
}

pub(crate) struct Table<V> {
    /// A power of two long (or empty before the first insert).
    slots: Vec<Slot<V>>,
    len: usize,
    zero: Option<V>,
    seed: Seed,
}

/// The placement function's key and multiplier (odd), drawn once per process (keys never
/// leave it).
#[derive(Clone, Copy)]
struct Seed {
    key: u64,
    multiplier: u64,
}

static SEED: std::sync::LazyLock<Seed> = std::sync::LazyLock::new(|| {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new();
    Seed { key: random.hash_one(0x0074_6162_6c65_u64), multiplier: random.hash_one(0x006d_756c_u64) | 1 }
});

/// Where `key` would sit first: the folded multiply of the keyed key by a secret odd
/// multiplier (foldhash's hash of a u64), inlined: every lookup, prefetch and slot a
/// removal shifts computes it.
#[inline(always)]
fn placement(key: u64, seed: Seed) -> u64 {
    let full = u128::from(key ^ seed.key) * u128::from(seed.multiplier);
    (full as u64) ^ ((full >> 64) as u64)
}

impl<V: Copy + Default> Default for Table<V> {
    fn default() -> Self {
        Table { slots: Vec::new(), len: 0, zero: None, seed: *SEED }
    }
}

impl<V: Copy + Default> Table<V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        placement(key, self.seed) as usize & self.mask()
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn probe(&self, key: u64) -> (usize, bool) {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match self.slots[i].key {
                0 => return (i, false),
                k if k == key => return (i, true),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Starts bringing `key`'s slot into the cache, without waiting for it; and the next
    /// slot's line when that is another (a lookup or a removal reads on past its slot).
    pub(crate) fn prefetch(&self, key: u64) {
        if self.slots.is_empty() {
            return;
        }
        let home = self.home(key);
        prefetch_line(&self.slots[home]);
        let next = &self.slots[(home + 1) & self.mask()];
        if (next as *const Slot<V> as usize) % 64 == 0 {
            prefetch_line(next);
        }
    }

    pub(crate) fn get(&self, key: u64) -> Option<V> {
        if key == 0 {
            return self.zero;
        }
        if self.slots.is_empty() {
            return None;
        }
        let (i, found) = self.probe(key);
        found.then(|| self.slots[i].val)
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        if key == 0 {
            return self.zero.as_mut();
        }
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(key) {
            (i, true) => Some(&mut self.slots[i].val),
            _ => None,
        }
    }

    /// Sets `key`'s value; the value it had.
    pub(crate) fn insert(&mut self, key: u64, val: V) -> Option<V> {
        if key == 0 {
            let old = self.zero.replace(val);
            self.len += usize::from(old.is_none());
            return old;
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let (i, found) = self.probe(key);
        if found {
            return Some(std::mem::replace(&mut self.slots[i].val, val));
        }
        self.slots[i] = Slot { key, val };
        self.len += 1;
        None
    }

    /// Takes `key` out; later entries of its run move back so that no lookup passes a hole.
    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        if key == 0 {
            let old = self.zero.take();
            self.len -= usize::from(old.is_some());
            return old;
        }
        if self.slots.is_empty() {
            return None;
        }
        let (mut hole, found) = self.probe(key);
        if !found {
            return None;
        }
        let val = self.slots[hole].val;
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j].key;
            if k == 0 {
                break;
            }
            // The entry at j may fill the hole when its home is not after the hole.
            let from_home = j.wrapping_sub(self.home(k)) & mask;
            if from_home >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
        Some(val)
    }

    /// Every value, in no order.
    pub(crate) fn values(&self) -> impl Iterator<Item = V> + '_ {
        self.zero.iter().copied().chain(self.slots.iter().filter(|s| s.key != 0).map(|s| s.val))
    }

    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(16);
        let mut slots = Vec::with_capacity(size);
        advise_huge_pages(&slots);
        slots.resize(size, Slot::default());
        let old = std::mem::replace(&mut self.slots, slots);
        for s in old.into_iter().filter(|s| s.key != 0) {
            let (i, _) = self.probe(s.key);
            self.slots[i] = s;
        }
    }
}

fn prefetch_line<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch((at as *const T).cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Asks for a large table's memory in 2 MiB pages, before it is first written: its
/// lookups land anywhere in it, and with 4 KiB pages nearly each would also miss the TLB.
fn advise_huge_pages<T>(v: &Vec<T>) {
    const HUGE: usize = 2 << 20;
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < 2 * HUGE {
        return;
    }
    let start = v.as_ptr() as usize;
    let (from, to) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
    if to > from {
        // SAFETY: advice on pages of this allocation only; it changes no contents. Refused
        // (no transparent huge pages) it changes nothing.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::Table;
    use std::collections::HashMap;

    proptest::proptest! {
        /// Any sequence of inserts and removes leaves the table agreeing with a HashMap,
        /// key 0 included, through its growth and the runs that removal shifts back.
        #[test]
        fn agrees_with_a_hashmap(ops in proptest::collection::vec((0u8..3, 0u64..64, proptest::num::u32::ANY), 0..600)) {
            let mut table: Table<u32> = Table::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            for (op, key, val) in ops {
                // Keys spread over the space and clustered: small ones collide in home slots.
                let key = if key % 2 == 0 { key } else { key.wrapping_mul(0x9e37_79b9_7f4a_7c15) };
                match op {
                    0 | 1 => proptest::prop_assert_eq!(table.insert(key, val), model.insert(key, val)),
                    _ => proptest::prop_assert_eq!(table.remove(key), model.remove(&key)),
                }
                proptest::prop_assert_eq!(table.len(), model.len());
            }
            for (k, v) in &model {
                proptest::prop_assert_eq!(table.get(*k), Some(*v));
            }
            let mut values: Vec<u32> = table.values().collect();
            let mut expected: Vec<u32> = model.values().copied().collect();
            values.sort_unstable();
            expected.sort_unstable();
            proptest::prop_assert_eq!(values, expected);
            for k in 0..64u64 {
                proptest::prop_assert_eq!(table.get(k), model.get(&k).copied());
            }
        }
    }

    #[test]
    fn stays_at_most_half_full_and_finds_every_key() {
        let mut t: Table<u64> = Table::default();
        for k in 1..=10_000u64 {
            t.insert(k * 7, k);
            assert!(t.len() * 2 <= t.slots.len());
        }
        assert!((1..=10_000u64).all(|k| t.get(k * 7) == Some(k)));
        assert_eq!(t.get(3), None);
        for k in (1..=10_000u64).step_by(2) {
            assert_eq!(t.remove(k * 7), Some(k));
        }
        assert!((1..=10_000u64).all(|k| t.get(k * 7) == (k % 2 == 0).then_some(k)));
        *t.get_mut(14).unwrap() = 1;
        assert_eq!(t.get(14), Some(1));
    }
}
