//! Packet cryptography: per-peer keys, the cipher suites, `cryptField` and HMAC/KBKDF.
//!
//! Everything here works in place on caller-owned buffers and never allocates.

use aes::Aes256;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, InnerIvInit, KeyInit, StreamCipher};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use poly1305::Poly1305;
use salsa20::cipher::KeyIvInit;
use salsa20::{Salsa12, Salsa20};
use sha2::{Digest, Sha384};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of the long-term per-peer key in bytes.
pub const SYMMETRIC_KEY_LEN: usize = 48;

/// Offset of the MAC field in a packet header.
const IDX_MAC: usize = 19;
/// Offset of the flags byte.
const IDX_FLAGS: usize = 18;
/// Offset of the verb byte (start of the encrypted envelope).
const IDX_VERB: usize = 27;
/// Minimum packet length (header plus verb byte).
const MIN_PACKET: usize = 28;

/// Why a packet could not be armored or dearmored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The buffer is shorter than a packet header.
    #[error("packet too short")]
    TooShort,
    /// The MAC did not match.
    #[error("authentication failed")]
    MacMismatch,
    /// The cipher suite is not one this implementation accepts here.
    #[error("unsupported cipher suite {0}")]
    UnsupportedSuite(u8),
    /// Suite 3 was requested but the key has no AES keys.
    #[error("no AES keys for this peer")]
    NoAesKeys,
}

/// A cipher suite number (bits 5..3 of the flags byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CipherSuite {
    /// Poly1305 MAC, no encryption (HELLO).
    Poly1305None = 0,
    /// Salsa20/12 encryption and Poly1305 MAC.
    Poly1305Salsa2012 = 1,
    /// Trusted path: neither encryption nor MAC.
    TrustedPath = 2,
    /// AES-GMAC-SIV.
    AesGmacSiv = 3,
}

impl CipherSuite {
    /// Decodes a suite number, if assigned.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Poly1305None),
            1 => Some(Self::Poly1305Salsa2012),
            2 => Some(Self::TrustedPath),
            3 => Some(Self::AesGmacSiv),
            _ => None,
        }
    }
}

/// The long-term symmetric key shared by two identities, with its derived AES keys.
#[derive(Clone)]
pub struct SymmetricKey {
    key: KeyBytes,
    aes: AesKeys,
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct KeyBytes([u8; SYMMETRIC_KEY_LEN]);

/// AES-GMAC-SIV key material: K0 (GMAC) with GHASH keyed by its hash subkey (cloned per
/// packet, so the subkey is expanded once per peer), and K1 (SIV/CTR).
#[derive(Clone)]
struct AesKeys {
    k0: Aes256,
    ghash: GHash,
    k1: Aes256,
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(..)")
    }
}

impl SymmetricKey {
    /// Builds the key from the 48 agreed bytes, deriving the AES-GMAC-SIV keys K0/K1.
    pub fn new(key: [u8; SYMMETRIC_KEY_LEN]) -> Self {
        let mut k0 = kbkdf_hmac_sha384(&key, b'0');
        let mut k1 = kbkdf_hmac_sha384(&key, b'1');
        let aes = AesKeys::new(&k0[..32], &k1[..32]);
        k0.zeroize();
        k1.zeroize();
        Self {
            key: KeyBytes(key),
            aes,
        }
    }

    /// The 48 key bytes.
    pub fn as_bytes(&self) -> &[u8; SYMMETRIC_KEY_LEN] {
        &self.key.0
    }

    fn salsa_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(&self.key.0[..32]);
        k
    }
}

impl AesKeys {
    fn new(k0: &[u8], k1: &[u8]) -> Self {
        let k0 = Aes256::new_from_slice(k0).unwrap_or_else(|_| unreachable_key());
        let k1 = Aes256::new_from_slice(k1).unwrap_or_else(|_| unreachable_key());
        let mut h = aes::Block::default();
        k0.encrypt_block(&mut h);
        let ghash = GHash::new(&h);
        h.zeroize();
        Self { k0, ghash, k1 }
    }
}

/// Slices passed to `AesKeys::new` always have 32 bytes; this keeps the code panic-free
/// without `unwrap` by returning a fixed (never used) key.
fn unreachable_key() -> Aes256 {
    Aes256::new(&[0u8; 32].into())
}

/// HMAC-SHA384 (RFC 2104).
pub fn hmac_sha384(key: &[u8], msg: &[u8]) -> [u8; 48] {
    let mut k = [0u8; 128];
    if key.len() > 128 {
        k[..48].copy_from_slice(&Sha384::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; 128];
    let mut opad = [0x5cu8; 128];
    for i in 0..128 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha384::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    let outer = Sha384::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize();
    k.zeroize();
    ipad.zeroize();
    opad.zeroize();
    let mut out = [0u8; 48];
    out.copy_from_slice(&outer);
    out
}

/// ZeroTier's single-iteration KBKDF with HMAC-SHA384 (label byte, context 0, 384 bits).
pub fn kbkdf_hmac_sha384(key: &[u8], label: u8) -> [u8; 48] {
    let msg = [0, 0, 0, 0, b'Z', b'T', label, 0, 0, 0, 0, 0x01, 0x80];
    hmac_sha384(key, &msg)
}

/// Computes the per-packet Salsa20/12 key from `key` and the packet header (spec 7.2).
pub fn mangle_key(key: &[u8; 32], packet: &[u8]) -> [u8; 32] {
    let mut mk = *key;
    for (i, b) in mk.iter_mut().enumerate().take(18) {
        *b ^= packet.get(i).copied().unwrap_or(0);
    }
    mk[18] ^= packet.get(IDX_FLAGS).copied().unwrap_or(0) & 0xf8;
    let n = packet.len();
    mk[19] ^= (n & 0xff) as u8;
    mk[20] ^= ((n >> 8) & 0xff) as u8;
    mk
}

fn nonce8(packet: &[u8]) -> [u8; 8] {
    let mut n = [0u8; 8];
    n.copy_from_slice(&packet[..8]);
    n
}

/// Salsa20/12 positioned after block 0, plus the Poly1305 one-time key from block 0.
fn salsa_and_poly_key(key: &SymmetricKey, packet: &[u8]) -> (Salsa12, [u8; 32]) {
    let mut mk = mangle_key(&key.salsa_key(), packet);
    let mut s = Salsa12::new(&mk.into(), &nonce8(packet).into());
    mk.zeroize();
    let mut block0 = [0u8; 64];
    s.apply_keystream(&mut block0);
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&block0[..32]);
    block0.zeroize();
    (s, pk)
}

/// Poly1305 over `data`: whole blocks go through `update` (the backend's multi-block
/// path), only the tail through `compute_unpadded`, which works one block at a time.
fn poly1305_tag(poly_key: &[u8; 32], data: &[u8]) -> poly1305::Tag {
    let (blocks, tail) = poly1305::Block::slice_as_chunks(data);
    let mut mac = Poly1305::new(poly_key.into());
    mac.update(blocks);
    mac.compute_unpadded(tail)
}

fn poly1305_8(poly_key: &[u8; 32], data: &[u8]) -> [u8; 8] {
    let tag = poly1305_tag(poly_key, data);
    let mut t = [0u8; 8];
    t.copy_from_slice(&tag[..8]);
    t
}

/// Constant-time equality of two byte slices of equal length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut d = 0u8;
    for (x, y) in a.iter().zip(b) {
        d |= x ^ y;
    }
    d == 0
}

/// Armors a complete packet in place (spec 7): sets the suite bits, encrypts and writes
/// the MAC. `packet` is the whole packet (header + verb + payload) with hop count 0 and
/// the fragment flag already decided. For suite 3 the packet ID bytes are replaced.
pub fn armor(packet: &mut [u8], key: &SymmetricKey, suite: CipherSuite) -> Result<(), CryptoError> {
    if packet.len() < MIN_PACKET {
        return Err(CryptoError::TooShort);
    }
    let flags = packet[IDX_FLAGS] & 0x47;
    match suite {
        CipherSuite::Poly1305None | CipherSuite::Poly1305Salsa2012 => {
            let encrypt = suite == CipherSuite::Poly1305Salsa2012;
            packet[IDX_FLAGS] = flags | ((suite as u8) << 3) | if encrypt { 0x80 } else { 0 };
            let (mut s, mut pk) = salsa_and_poly_key(key, packet);
            if encrypt {
                s.apply_keystream(&mut packet[IDX_VERB..]);
            }
            let tag = poly1305_8(&pk, &packet[IDX_VERB..]);
            pk.zeroize();
            packet[IDX_MAC..IDX_VERB].copy_from_slice(&tag);
            Ok(())
        }
        CipherSuite::AesGmacSiv => {
            packet[IDX_FLAGS] = flags | (3 << 3);
            let mut iv = [0u8; 8];
            iv.copy_from_slice(&packet[..8]);
            let mut aad = [0u8; 11];
            aad.copy_from_slice(&packet[8..19]);
            aad[10] &= 0xf8;
            let tag = gmac_siv_encrypt(&key.aes, &iv, &aad, &mut packet[IDX_VERB..]);
            packet[..8].copy_from_slice(&tag[..8]);
            packet[IDX_MAC..IDX_VERB].copy_from_slice(&tag[8..]);
            Ok(())
        }
        CipherSuite::TrustedPath => Err(CryptoError::UnsupportedSuite(2)),
    }
}

/// Checks and decrypts a complete (reassembled) packet in place with `key`.
///
/// The suite is read from the flags byte; suite 2 (trusted path) is refused here because
/// it needs a path check the caller does. Returns the suite that was used.
pub fn dearmor(packet: &mut [u8], key: &SymmetricKey) -> Result<CipherSuite, CryptoError> {
    if packet.len() < MIN_PACKET {
        return Err(CryptoError::TooShort);
    }
    let suite_bits = (packet[IDX_FLAGS] >> 3) & 7;
    match suite_bits {
        0 | 1 => {
            let (mut s, mut pk) = salsa_and_poly_key(key, packet);
            let tag = poly1305_8(&pk, &packet[IDX_VERB..]);
            pk.zeroize();
            if !ct_eq(&tag, &packet[IDX_MAC..IDX_VERB]) {
                return Err(CryptoError::MacMismatch);
            }
            if suite_bits == 1 {
                s.apply_keystream(&mut packet[IDX_VERB..]);
                Ok(CipherSuite::Poly1305Salsa2012)
            } else {
                Ok(CipherSuite::Poly1305None)
            }
        }
        3 => {
            let mut tag = [0u8; 16];
            tag[..8].copy_from_slice(&packet[..8]);
            tag[8..].copy_from_slice(&packet[IDX_MAC..IDX_VERB]);
            let mut aad = [0u8; 11];
            aad.copy_from_slice(&packet[8..19]);
            aad[10] &= 0xf8;
            if gmac_siv_decrypt(&key.aes, &tag, &aad, &mut packet[IDX_VERB..]) {
                Ok(CipherSuite::AesGmacSiv)
            } else {
                Err(CryptoError::MacMismatch)
            }
        }
        other => Err(CryptoError::UnsupportedSuite(other)),
    }
}

/// GMAC (GHASH over `aad` zero-padded to 16 bytes followed by `data`) with key K0 and
/// the 12-byte IV `iv8 ‖ 0⁴`. Returns the 16-byte tag.
fn gmac(k: &AesKeys, iv8: &[u8; 8], aad: &[u8], data: &[u8]) -> [u8; 16] {
    let mut gh = k.ghash.clone();
    gh.update_padded(aad);
    gh.update_padded(data);
    let total_bits = ((aad.len().div_ceil(16) * 16 + data.len()) as u64) * 8;
    let mut len_block = [0u8; 16];
    len_block[..8].copy_from_slice(&total_bits.to_be_bytes());
    gh.update(&[len_block.into()]);
    let s = gh.finalize();
    let mut j0 = aes::Block::default();
    j0[..8].copy_from_slice(iv8);
    j0[15] = 1;
    k.k0.encrypt_block(&mut j0);
    let mut out = [0u8; 16];
    for i in 0..16 {
        out[i] = s[i] ^ j0[i];
    }
    out
}

/// AES-256-CTR with K1 from `tag` (bit 7 of byte 12 cleared), counting in the last four bytes
/// big-endian and wrapping, as ZeroTier's suite 3 does.
fn ctr_apply(k: &AesKeys, tag: &[u8; 16], data: &mut [u8]) {
    let mut c = *tag;
    c[12] &= 0x7f;
    let core =
        ctr::CtrCore::<Aes256, ctr::flavors::Ctr32BE>::inner_iv_init(k.k1.clone(), &c.into());
    let mut ctr = ctr::Ctr32BE::<Aes256>::from_core(core);
    ctr.apply_keystream(data);
}

/// AES-GMAC-SIV encryption as ZeroTier's suite 3: encrypts `data` in place and returns
/// the 16-byte tag.
fn gmac_siv_encrypt(k: &AesKeys, iv: &[u8; 8], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
    let g = gmac(k, iv, aad, data);
    let mut block = aes::Block::default();
    block[..8].copy_from_slice(iv);
    for i in 0..8 {
        block[8 + i] = g[i] ^ g[8 + i];
    }
    k.k1.encrypt_block(&mut block);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&block);
    ctr_apply(k, &tag, data);
    tag
}

/// AES-GMAC-SIV decryption: decrypts `data` in place and returns whether the tag holds.
/// On failure the data is left decrypted-but-untrusted; callers drop the packet.
fn gmac_siv_decrypt(k: &AesKeys, tag: &[u8; 16], aad: &[u8], data: &mut [u8]) -> bool {
    ctr_apply(k, tag, data);
    let mut block: aes::Block = (*tag).into();
    k.k1.decrypt_block(&mut block);
    let mut iv = [0u8; 8];
    iv.copy_from_slice(&block[..8]);
    let g = gmac(k, &iv, aad, data);
    let mut f = [0u8; 8];
    for i in 0..8 {
        f[i] = g[i] ^ g[8 + i];
    }
    ct_eq(&f, &block[8..16])
}

/// Raw AES-GMAC-SIV with explicit keys, for known-answer tests and tools.
///
/// Encrypts `data` in place and returns the tag. `k0`/`k1` are 32-byte AES-256 keys.
pub fn aes_gmac_siv_encrypt(
    k0: &[u8; 32],
    k1: &[u8; 32],
    iv: &[u8; 8],
    aad: &[u8],
    data: &mut [u8],
) -> [u8; 16] {
    gmac_siv_encrypt(&AesKeys::new(k0, k1), iv, aad, data)
}

/// Raw AES-GMAC-SIV decryption with explicit keys; returns whether the tag is valid.
pub fn aes_gmac_siv_decrypt(
    k0: &[u8; 32],
    k1: &[u8; 32],
    tag: &[u8; 16],
    aad: &[u8],
    data: &mut [u8],
) -> bool {
    gmac_siv_decrypt(&AesKeys::new(k0, k1), tag, aad, data)
}

/// Encrypts or decrypts the HELLO field starting at `start` (spec 8) in place.
///
/// Uses the unmangled key and the packet ID with the low 3 bits of byte 7 cleared.
pub fn crypt_field(key: &SymmetricKey, packet: &mut [u8], start: usize) {
    if packet.len() < 8 || start >= packet.len() {
        return;
    }
    let mut iv = nonce8(packet);
    iv[7] &= 0xf8;
    let mut k = key.salsa_key();
    let mut s = Salsa12::new(&k.into(), &iv.into());
    k.zeroize();
    s.apply_keystream(&mut packet[start..]);
}

/// Unpredictable bytes for packet IDs and the like without a system call each: the
/// Salsa20/20 keystream under a key and nonce drawn once from the OS generator. The stream
/// never repeats within 2^70 bytes, and knowing earlier output does not reveal later output
/// without the key.
pub(crate) struct Csprng {
    cipher: Salsa20,
    block: [u8; 64],
    used: usize,
}

impl std::fmt::Debug for Csprng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Csprng(..)")
    }
}

impl Csprng {
    /// Seeds a generator from the OS; `None` if the OS generator failed.
    pub(crate) fn from_os() -> Option<Self> {
        let mut key = [0u8; 32];
        let mut nonce = [0u8; 8];
        let ok = getrandom::fill(&mut key).is_ok() && getrandom::fill(&mut nonce).is_ok();
        let cipher = Salsa20::new(&key.into(), &nonce.into());
        key.zeroize();
        ok.then_some(Self {
            cipher,
            block: [0; 64],
            used: 64,
        })
    }

    /// The next 8 bytes of the stream.
    pub(crate) fn next8(&mut self) -> [u8; 8] {
        if self.used == self.block.len() {
            self.block = [0; 64];
            self.cipher.apply_keystream(&mut self.block);
            self.used = 0;
        }
        let mut out = [0u8; 8];
        out.copy_from_slice(&self.block[self.used..self.used + 8]);
        self.block[self.used..self.used + 8].zeroize();
        self.used += 8;
        out
    }
}

/// XORs `data` with the Salsa20/12 keystream for (`key`, `nonce`) from block 0.
pub fn salsa2012_xor(key: &[u8; 32], nonce: &[u8; 8], data: &mut [u8]) {
    Salsa12::new(key.into(), nonce.into()).apply_keystream(data);
}

/// XORs `data` with the Salsa20/20 keystream for (`key`, `nonce`) from block 0.
pub fn salsa20_xor(key: &[u8; 32], nonce: &[u8; 8], data: &mut [u8]) {
    Salsa20::new(key.into(), nonce.into()).apply_keystream(data);
}

/// Full 16-byte one-time Poly1305 tag.
pub fn poly1305(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    let t = poly1305_tag(key, data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SymmetricKey {
        let mut k = [0u8; 48];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        SymmetricKey::new(k)
    }

    #[test]
    fn all_suites_round_trip() {
        for suite in [
            CipherSuite::Poly1305None,
            CipherSuite::Poly1305Salsa2012,
            CipherSuite::AesGmacSiv,
        ] {
            let mut p: Vec<u8> = (0..100u8).collect();
            p[13] = 0x01;
            p[18] = 0;
            let orig = p.clone();
            armor(&mut p, &key(), suite).unwrap();
            assert_eq!(dearmor(&mut p, &key()).unwrap(), suite);
            assert_eq!(&p[27..], &orig[27..]);
        }
    }

    #[test]
    fn ctr_matches_block_by_block_counting_across_chunks() {
        let k = key();
        let mut tag = [0xa5u8; 16];
        // The counter starts just below a carry out of byte 15 and byte 14.
        tag[12..].copy_from_slice(&[0xff, 0xff, 0xff, 0xf0]);
        for len in [0, 1, 15, 16, 17, 511, 512, 513, 1427, 2838, 9928] {
            let mut data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let orig = data.clone();
            ctr_apply(&k.aes, &tag, &mut data);
            for (i, block) in orig.chunks(16).enumerate() {
                let mut ks = aes::Block::default();
                ks[..12].copy_from_slice(&tag[..12]);
                ks[12] &= 0x7f;
                let counter = 0x7fff_fff0u32.wrapping_add(i as u32);
                ks[12..].copy_from_slice(&counter.to_be_bytes());
                k.aes.k1.encrypt_block(&mut ks);
                for (j, b) in block.iter().enumerate() {
                    assert_eq!(data[i * 16 + j], b ^ ks[j], "{len} bytes, block {i}");
                }
            }
        }
    }

    #[test]
    fn short_packets_are_refused() {
        let mut p = [0u8; 10];
        assert_eq!(dearmor(&mut p, &key()), Err(CryptoError::TooShort));
    }
}
