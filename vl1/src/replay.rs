//! A per-peer filter of recently seen packet IDs. Checked only after a packet's MAC has been
//! verified, so forged packets cannot poison it; an authenticated duplicate or a replay of a
//! recent packet is dropped (1.x has no such check; nothing legitimate repeats a packet ID).

/// Number of direct-mapped slots (a power of two): 1 KiB per peer.
const SLOTS: usize = 128;

/// Recently seen packet IDs of one peer.
#[derive(Debug, Clone)]
pub(crate) struct ReplayWindow {
    ids: [u64; SLOTS],
    filled: u128,
}

impl ReplayWindow {
    /// An empty filter.
    pub(crate) fn new() -> Self {
        Self {
            ids: [0; SLOTS],
            filled: 0,
        }
    }

    /// Records `id`; returns false when it was seen recently (a duplicate or a replay).
    pub(crate) fn insert(&mut self, id: u64) -> bool {
        // Fibonacci hashing spreads both counter-like and random IDs over the slots.
        let slot =
            (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize;
        let bit = 1u128 << slot;
        if self.filled & bit != 0 && self.ids[slot] == id {
            return false;
        }
        self.ids[slot] = id;
        self.filled |= bit;
        true
    }
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
}
