//! How local identities and received datagrams are spread over the data-plane threads.
//!
//! Each data-plane thread (a shard) owns a share of the local identities and a socket of its
//! own in one `SO_REUSEPORT` group on the host's UDP port. The shard of an identity is a pure
//! function of its address ([`shard_of`]): the host identity is always on shard 0, any other
//! address on its first four bytes modulo the shard count. A classic BPF program attached to
//! the group ([`steering_program`]) computes the same function on the destination address of
//! each arriving datagram (bytes 8..13 of a VL1 packet and of a fragment alike), so the kernel
//! hands every datagram straight to the thread that owns its destination. Datagrams too short
//! to name one go to shard 0, whose host node counts them.

use flatwire_vl1::Address;
use libc::{
    BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_MOD, BPF_RET, BPF_W,
    sock_filter,
};

/// Most data-plane threads an agent runs.
pub const MAX_SHARDS: usize = 64;

/// The shard that owns `dest` among `shards` (at least 1), `host` being the host identity.
pub fn shard_of(dest: Address, host: Address, shards: usize) -> usize {
    if shards <= 1 || dest == host {
        return 0;
    }
    let b = dest.to_bytes();
    (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % shards as u32) as usize
}

/// The classic BPF program for `SO_ATTACH_REUSEPORT_CBPF` that computes [`shard_of`] on the
/// destination address of a datagram (the kernel runs it on the UDP payload and delivers to
/// the socket of the returned index, in bind order). A load past the end of a short datagram
/// ends the program with 0: shard 0.
pub fn steering_program(host: Address, shards: usize) -> Vec<sock_filter> {
    let h = host.to_bytes();
    let hi = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    vec![
        // 0: A = bytes 8..12 (big-endian)
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 8),
        // 1: the host's first four bytes? then check the fifth, else hash
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 2, hi),
        // 2: A = byte 12
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 12),
        // 3: the host itself: shard 0 (7); else hash (4)
        op(BPF_JMP | BPF_JEQ | BPF_K, 3, 0, u32::from(h[4])),
        // 4: A = bytes 8..12 again
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 8),
        // 5: A %= shards
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, shards.max(1) as u32),
        // 6: that shard
        op(BPF_RET | BPF_A, 0, 0, 0),
        // 7: shard 0
        op(BPF_RET | BPF_K, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        s.parse().unwrap()
    }

    #[test]
    fn the_host_is_on_shard_zero_and_others_spread_by_their_first_four_bytes() {
        let host = addr("0000000301");
        assert_eq!(shard_of(host, host, 4), 0, "3 % 4 would say 3");
        assert_eq!(shard_of(addr("0000000302"), host, 4), 3);
        assert_eq!(shard_of(addr("0000000105"), host, 2), 1);
        assert_eq!(shard_of(addr("0000000205"), host, 2), 0);
        assert_eq!(shard_of(addr("ffffffff05"), host, 1), 0);
        let mut per = [0usize; 3];
        for i in 0u32..3000 {
            let b = i.wrapping_mul(2_654_435_761).to_be_bytes();
            per[shard_of(Address::from_bytes([b[0], b[1], b[2], b[3], 7]), host, 3)] += 1;
        }
        assert!(per.iter().all(|&n| n > 900), "{per:?}");
    }
}
