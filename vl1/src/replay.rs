//! A per-peer filter of recently seen packet IDs. Checked only after a packet's MAC has been
//! verified, so forged packets cannot poison it; an authenticated duplicate or a replay of a
//! recent packet is dropped (1.x has no such check; nothing legitimate repeats a packet ID).

/// Number of direct-mapped slots (a power of two): 1 KiB per peer.
const SLOTS: usize = 128;
/// The most recent IDs are also kept exactly, whatever slots they map to.
const RING: usize = 32;

/// Recently seen packet IDs of one peer: the last [`RING`] exactly, older ones as long as no
/// newer ID took their slot.
#[derive(Debug, Clone)]
pub(crate) struct ReplayWindow {
    ids: [u64; SLOTS],
    filled: u128,
    ring: [u64; RING],
    ring_len: usize,
    ring_next: usize,
}

impl ReplayWindow {
    /// An empty filter.
    pub(crate) fn new() -> Self {
        Self {
            ids: [0; SLOTS],
            filled: 0,
            ring: [0; RING],
            ring_len: 0,
            ring_next: 0,
        }
    }

    /// Records `id`; returns false when it was seen recently (a duplicate or a replay).
    pub(crate) fn insert(&mut self, id: u64) -> bool {
        let slot = slot_of(id);
        let bit = 1u128 << slot;
        if (self.filled & bit != 0 && self.ids[slot] == id)
            || self.ring[..self.ring_len].contains(&id)
        {
            return false;
        }
        self.ids[slot] = id;
        self.filled |= bit;
        self.ring[self.ring_next] = id;
        self.ring_next = (self.ring_next + 1) % RING;
        self.ring_len = (self.ring_len + 1).min(RING);
        true
    }
}

/// Fibonacci hashing spreads both counter-like and random IDs over the slots.
fn slot_of(id: u64) -> usize {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_refused_and_new_ids_pass() {
        let mut w = ReplayWindow::new();
        assert!(w.insert(0));
        assert!(!w.insert(0));
        for id in 1..=64u64 {
            assert!(w.insert(id), "{id}");
        }
        // Counter-like IDs land in distinct slots, so a recent one is still remembered.
        assert!(!w.insert(64));
        assert!(!w.insert(63));
    }

    #[test]
    fn the_last_ids_are_refused_even_when_they_share_a_slot() {
        // 40 IDs that all map to one slot: the direct-mapped table keeps only the last.
        let ids: Vec<u64> = (1..)
            .filter(|&id| slot_of(id) == slot_of(7))
            .take(40)
            .collect();
        let mut w = ReplayWindow::new();
        for &id in &ids {
            assert!(w.insert(id), "{id}");
        }
        for &id in &ids[ids.len() - RING..] {
            assert!(!w.insert(id), "recent {id} was accepted again");
        }
    }
}
