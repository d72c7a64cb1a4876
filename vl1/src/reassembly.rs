//! Bounded fragment reassembly (spec 10.3).
//!
//! A fixed ring of slots, each holding the head and up to six fragments of one packet.
//! Limits: number of slots, total bytes held, and the age of an incomplete set. Buffers
//! are reused between packets, so steady-state reassembly does not allocate.

use crate::wire::{FRAGMENT_HEADER_LEN, Fragment, MAX_FRAGMENTS, MAX_PACKET_LEN, Packet};

/// Limits of a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Number of packets being assembled at once (1.x: 32).
    pub slots: usize,
    /// Upper bound on bytes held across all slots.
    pub max_bytes: usize,
    /// Incomplete sets older than this (ms) are discarded.
    pub max_age_ms: u64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            slots: 32,
            max_bytes: 32 * MAX_PACKET_LEN,
            max_age_ms: 5000,
        }
    }
}

/// Why a piece was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// The buffer is not a well-formed head or fragment.
    #[error("malformed piece")]
    Malformed,
    /// Total or number outside 2..=7 / 1..=6.
    #[error("fragment numbering out of range")]
    BadNumbering,
    /// This piece is already held.
    #[error("duplicate piece")]
    Duplicate,
    /// Holding it would exceed the memory limit.
    #[error("reassembly memory limit")]
    MemoryLimit,
    /// The assembled packet would exceed the maximum packet length.
    #[error("assembled packet too long")]
    TooLong,
}

#[derive(Debug)]
struct Slot<M> {
    in_use: bool,
    packet_id: u64,
    created: u64,
    mask: u8,
    total: u8,
    meta: Option<M>,
    pieces: [Vec<u8>; MAX_FRAGMENTS],
}

impl<M> Slot<M> {
    fn new() -> Self {
        Self {
            in_use: false,
            packet_id: 0,
            created: 0,
            mask: 0,
            total: 0,
            meta: None,
            pieces: Default::default(),
        }
    }
    fn held(&self) -> usize {
        if self.in_use {
            self.pieces.iter().map(Vec::len).sum()
        } else {
            0
        }
    }
    fn clear(&mut self) {
        self.in_use = false;
        self.mask = 0;
        self.total = 0;
        self.meta = None;
        for p in &mut self.pieces {
            p.clear();
        }
    }
}

/// Reassembles fragmented packets; `M` is metadata kept from the head (e.g. its path).
#[derive(Debug)]
pub struct Reassembler<M> {
    limits: ReassemblyLimits,
    slots: Vec<Slot<M>>,
    next: usize,
    held: usize,
    /// Incomplete sets discarded (expired, or evicted for a newer one) since the last
    /// [`Reassembler::take_abandoned`].
    abandoned: u64,
}

impl<M: Clone> Reassembler<M> {
    /// Creates a reassembler with `limits` (at least one slot).
    pub fn new(limits: ReassemblyLimits) -> Self {
        let n = limits.slots.max(1);
        Self {
            limits,
            slots: (0..n).map(|_| Slot::new()).collect(),
            next: 0,
            held: 0,
            abandoned: 0,
        }
    }

    /// Bytes currently held.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Number of incomplete packets held.
    pub fn pending(&self) -> usize {
        self.slots.iter().filter(|s| s.in_use).count()
    }

    /// Discards incomplete sets older than the age limit. Call from the timer.
    pub fn expire(&mut self, now: u64) {
        for s in &mut self.slots {
            if s.in_use && now.saturating_sub(s.created) > self.limits.max_age_ms {
                self.held -= s.held();
                s.clear();
                self.abandoned += 1;
            }
        }
    }

    /// How many incomplete sets were discarded (expired, or evicted to make room for a
    /// newer one) since the previous call: each is a packet that never arrived whole.
    pub fn take_abandoned(&mut self) -> u64 {
        std::mem::take(&mut self.abandoned)
    }

    fn slot_for(&mut self, now: u64, id: u64) -> usize {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.in_use && s.packet_id == id)
        {
            return i;
        }
        let i = self
            .slots
            .iter()
            .position(|s| !s.in_use)
            .unwrap_or_else(|| {
                let i = self.next;
                self.next = (self.next + 1) % self.slots.len();
                i
            });
        let s = &mut self.slots[i];
        if s.in_use {
            self.abandoned += 1;
        }
        self.held -= s.held();
        s.clear();
        s.in_use = true;
        s.packet_id = id;
        s.created = now;
        i
    }

    fn store(&mut self, i: usize, n: usize, data: &[u8]) -> Result<(), ReassemblyError> {
        if self.held + data.len() > self.limits.max_bytes {
            return Err(ReassemblyError::MemoryLimit);
        }
        let s = &mut self.slots[i];
        if s.mask & (1 << n) != 0 {
            return Err(ReassemblyError::Duplicate);
        }
        s.mask |= 1 << n;
        s.pieces[n].clear();
        s.pieces[n].extend_from_slice(data);
        self.held += data.len();
        Ok(())
    }

    fn try_complete(&mut self, i: usize, out: &mut Vec<u8>) -> Result<Option<M>, ReassemblyError> {
        let s = &mut self.slots[i];
        if s.total < 2 || s.mask & 1 == 0 {
            return Ok(None);
        }
        let want = (1u16 << s.total) as u8;
        if s.mask != want.wrapping_sub(1) {
            return Ok(None);
        }
        let len: usize = s.pieces[..s.total as usize].iter().map(Vec::len).sum();
        let held = s.held();
        let meta = s.meta.take();
        if len > MAX_PACKET_LEN {
            self.held -= held;
            self.slots[i].clear();
            return Err(ReassemblyError::TooLong);
        }
        out.clear();
        for p in &s.pieces[..s.total as usize] {
            out.extend_from_slice(p);
        }
        self.held -= held;
        self.slots[i].clear();
        Ok(meta)
    }

    /// Adds a packet head (a packet with the fragmented flag). Returns `Some(meta)` with
    /// the packet in `out` when this completed it. Call for every head addressed to us.
    pub fn add_head(
        &mut self,
        now: u64,
        head: &[u8],
        meta: M,
        out: &mut Vec<u8>,
    ) -> Result<Option<M>, ReassemblyError> {
        let p = Packet::new_checked(head).map_err(|_| ReassemblyError::Malformed)?;
        let i = self.slot_for(now, p.packet_id());
        self.store(i, 0, head)?;
        self.slots[i].meta = Some(meta);
        self.try_complete(i, out)
    }

    /// Adds a fragment. Returns `Some(meta)` (the head's) with the packet in `out` when
    /// this completed it. Call for every fragment addressed to us.
    pub fn add_fragment(
        &mut self,
        now: u64,
        fragment: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<M>, ReassemblyError> {
        let f = Fragment::new_checked(fragment).map_err(|_| ReassemblyError::Malformed)?;
        let (total, n) = (f.total(), f.number());
        if !(2..=MAX_FRAGMENTS as u8).contains(&total) || n < 1 || n >= total {
            return Err(ReassemblyError::BadNumbering);
        }
        let i = self.slot_for(now, f.packet_id());
        self.store(i, n as usize, &fragment[FRAGMENT_HEADER_LEN..])?;
        self.slots[i].total = total;
        self.try_complete(i, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    fn packet(len: usize) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|i| i as u8).collect();
        p[13] = 1;
        p[18] = wire::FLAG_FRAGMENTED;
        p
    }

    #[test]
    fn reassembles_in_any_order() {
        let p = packet(4000);
        let mut pieces = Vec::new();
        let mut s = Vec::new();
        wire::fragment(&p, 1432, wire::Split::Full, &mut s, |d| {
            pieces.push(d.to_vec())
        })
        .unwrap();
        assert_eq!(pieces.len(), 3);
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut out = Vec::new();
        assert_eq!(r.add_fragment(0, &pieces[2], &mut out), Ok(None));
        assert_eq!(
            r.add_fragment(0, &pieces[2], &mut out),
            Err(ReassemblyError::Duplicate)
        );
        assert_eq!(r.add_head(0, &pieces[0], 7u8, &mut out), Ok(None));
        assert_eq!(r.add_fragment(0, &pieces[1], &mut out), Ok(Some(7)));
        assert_eq!(out, p);
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn even_splits_match_the_full_split_and_reassemble() {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let (mut out, mut s) = (Vec::new(), Vec::new());
        for len in (1433..=1432 + 6 * 1416).step_by(7) {
            let p = packet(len);
            let mut cut = |split| {
                let mut pieces: Vec<Vec<u8>> = Vec::new();
                wire::fragment(&p, 1432, split, &mut s, |d| pieces.push(d.to_vec())).unwrap();
                pieces
            };
            let (full, even) = (cut(wire::Split::Full), cut(wire::Split::Even));
            assert_eq!(full.len(), even.len(), "{len} bytes");
            assert_eq!(full[0].len(), 1432);
            let first = even[0].len();
            assert!(first <= 1432 && even.iter().all(|d| d.len() <= first));
            assert!(even[..even.len() - 1].iter().all(|d| d.len() == first));
            assert!(
                first - even[even.len() - 1].len() < even.len(),
                "{len}: near equal"
            );
            for (i, d) in even.iter().enumerate().rev() {
                let done = match i {
                    0 => r.add_head(0, d, (), &mut out),
                    _ => r.add_fragment(0, d, &mut out),
                };
                assert_eq!(done, Ok((i == 0).then_some(())));
            }
            assert_eq!(out, p);
        }
    }

    #[test]
    fn limits_hold() {
        let p = packet(3000);
        let mut pieces = Vec::new();
        let mut s = Vec::new();
        wire::fragment(&p, 1432, wire::Split::Full, &mut s, |d| {
            pieces.push(d.to_vec())
        })
        .unwrap();
        let mut r = Reassembler::new(ReassemblyLimits {
            slots: 2,
            max_bytes: 2000,
            max_age_ms: 100,
        });
        let mut out = Vec::new();
        r.add_head(0, &pieces[0], (), &mut out).unwrap();
        assert_eq!(
            r.add_fragment(0, &pieces[1], &mut out),
            Err(ReassemblyError::MemoryLimit)
        );
        r.expire(1000);
        assert_eq!((r.pending(), r.held_bytes()), (0, 0));
        assert_eq!(r.take_abandoned(), 1, "the expired set is counted");
        assert_eq!(r.take_abandoned(), 0);
        let mut bad = pieces[1].clone();
        bad[14] = 0x88;
        assert_eq!(
            r.add_fragment(0, &bad, &mut out),
            Err(ReassemblyError::BadNumbering)
        );
    }
}
