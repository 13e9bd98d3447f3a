//! Who holds one block, as the index keeps it: nearly always one rank, so the common case
//! is the rank's id in the index's own slot (no allocation, 16 bytes a block with its
//! key); a block several ranks hold points into a list kept apart (`HolderLists`).

/// A block's holders: one holder's id, or with MANY set the place of a list of ids.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub(crate) struct Holders(u32);

const MANY: u32 = 1 << 31;

/// The lists of blocks held more than once, each sorted (a block a thousand ranks hold,
/// a system prompt cached everywhere, costs a binary search, not a scan); places of lists
/// emptied are reused.
#[derive(Default)]
pub(crate) struct HolderLists {
    lists: Vec<Vec<u32>>,
    free: Vec<u32>,
}

impl Holders {
    /// A block held by `id` alone (ids are below 2^31: one per subscribed rank).
    pub(crate) fn one(id: u32) -> Holders {
        debug_assert!(id < MANY);
        Holders(id)
    }
}

impl HolderLists {
    pub(crate) fn contains(&self, h: Holders, id: u32) -> bool {
        match h.0 & MANY {
            0 => h.0 == id,
            _ => self.lists[(h.0 & !MANY) as usize].binary_search(&id).is_ok(),
        }
    }

    pub(crate) fn insert(&mut self, h: &mut Holders, id: u32) {
        if h.0 == id {
            return;
        }
        if h.0 & MANY == 0 {
            let list = if h.0 < id { vec![h.0, id] } else { vec![id, h.0] };
            *h = Holders(MANY | place(&mut self.lists, &mut self.free, list));
            return;
        }
        let list = &mut self.lists[(h.0 & !MANY) as usize];
        if let Err(at) = list.binary_search(&id) {
            list.insert(at, id);
        }
    }

    /// Takes `id` out of `h`; true when no holder is left.
    pub(crate) fn remove(&mut self, h: &mut Holders, id: u32) -> bool {
        if h.0 & MANY == 0 {
            return h.0 == id;
        }
        let at = h.0 & !MANY;
        let list = &mut self.lists[at as usize];
        if let Ok(at) = list.binary_search(&id) {
            list.remove(at);
        }
        if let [last] = list[..] {
            *h = Holders(last);
            self.lists[at as usize] = Vec::new();
            self.free.push(at);
        }
        false
    }

    pub(crate) fn ids(&self, h: Holders) -> Vec<u32> {
        match h.0 & MANY {
            0 => vec![h.0],
            _ => self.lists[(h.0 & !MANY) as usize].clone(),
        }
    }
}

/// Puts `item` in the first free place of `items` (one given back earlier), or at its end:
/// its place.
pub(crate) fn place<T>(items: &mut Vec<T>, free: &mut Vec<u32>, item: T) -> u32 {
    match free.pop() {
        Some(at) => {
            items[at as usize] = item;
            at
        }
        None => {
            items.push(item);
            (items.len() - 1) as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{HolderLists, Holders};

    #[test]
    fn a_block_goes_from_one_holder_to_many_and_back_reusing_list_places() {
        let mut lists = HolderLists::default();
        let mut h = Holders::one(3);
        lists.insert(&mut h, 3);
        assert_eq!(h, Holders::one(3), "the same holder again is no list");
        lists.insert(&mut h, 5);
        lists.insert(&mut h, 5);
        lists.insert(&mut h, 1);
        assert_eq!(lists.ids(h), vec![1, 3, 5], "kept sorted");
        assert!(!lists.remove(&mut h, 1));
        assert!(lists.contains(h, 5) && !lists.contains(h, 4));
        assert!(!lists.remove(&mut h, 3));
        assert_eq!(h, Holders::one(5), "back to one holder: the list is freed");
        assert!(lists.remove(&mut h, 5), "the last holder gone");
        // A second block's list takes the freed place.
        let mut g = Holders::one(1);
        lists.insert(&mut g, 2);
        assert_eq!(lists.lists.len(), 1);
        assert!(!lists.remove(&mut Holders::one(9), 1), "another holder's block is not emptied");
    }
}
