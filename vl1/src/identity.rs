//! Type-0 identities: Curve25519 (X25519) + Ed25519 key pairs bound to a 40-bit address by
//! a memory-hard hash.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use salsa20::Salsa20;
use salsa20::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest, Sha512};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::address::Address;
use crate::crypto::{SYMMETRIC_KEY_LEN, SymmetricKey, ct_eq};

/// Public key length (X25519 ‖ Ed25519).
pub const PUBLIC_KEY_LEN: usize = 64;
/// Secret key length (X25519 scalar ‖ Ed25519 seed).
pub const SECRET_KEY_LEN: usize = 64;
/// Signature length (Ed25519 signature ‖ first 32 bytes of SHA-512(message)).
pub const SIGNATURE_LEN: usize = 96;
/// Length of the binary public identity.
pub const BINARY_PUBLIC_LEN: usize = 71;
/// Length of the binary identity with its secret.
pub const BINARY_SECRET_LEN: usize = 135;

const HASH_MEMORY: usize = 2_097_152;

/// Errors from identity parsing, generation and use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Malformed text form.
    #[error("malformed identity text: {0}")]
    Syntax(&'static str),
    /// Malformed binary form.
    #[error("malformed identity binary: {0}")]
    Binary(&'static str),
    /// The address is reserved (0 or 0xff prefix).
    #[error("reserved address")]
    ReservedAddress,
    /// A secret key is needed for this operation.
    #[error("identity has no secret key")]
    NoSecret,
    /// Generation was cancelled through the cancel flag.
    #[error("identity generation cancelled")]
    Cancelled,
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
}

#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Secret([u8; SECRET_KEY_LEN]);

/// A ZeroTier type-0 identity: address, 64-byte public key and optionally the secret key.
///
/// Equality compares the address and public key only. Secret bytes are zeroed on drop.
#[derive(Clone)]
pub struct Identity {
    address: Address,
    public: [u8; PUBLIC_KEY_LEN],
    secret: Option<Secret>,
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.address == other.address && self.public == other.public
    }
}
impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.address.hash(state);
        self.public.hash(state);
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Identity({}, secret: {})",
            self.address,
            self.secret.is_some()
        )
    }
}

/// Computes the 64-byte memory-hard digest of a public key (spec 3.3).
pub fn memory_hard_digest(public: &[u8; PUBLIC_KEY_LEN]) -> [u8; 64] {
    let mut mem = vec![0u8; HASH_MEMORY];
    memory_hard_digest_with(public, &mut mem)
}

fn memory_hard_digest_with(public: &[u8; PUBLIC_KEY_LEN], mem: &mut [u8]) -> [u8; 64] {
    let mut d = [0u8; 64];
    d.copy_from_slice(&Sha512::digest(public));
    let mut key = [0u8; 32];
    key.copy_from_slice(&d[..32]);
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&d[32..40]);
    let mut s = Salsa20::new(&key.into(), &nonce.into());
    mem.fill(0);
    s.apply_keystream(mem);
    for n in 64..mem.len() {
        mem[n] ^= mem[n - 64];
    }
    let words = mem.len() / 8;
    let mut i = 0;
    while i + 1 < words {
        let idx1 = (be64(mem, i) % 8) as usize;
        let idx2 = (be64(mem, i + 1) % words as u64) as usize;
        let mut tmp = [0u8; 8];
        tmp.copy_from_slice(&mem[idx2 * 8..idx2 * 8 + 8]);
        mem[idx2 * 8..idx2 * 8 + 8].copy_from_slice(&d[idx1 * 8..idx1 * 8 + 8]);
        d[idx1 * 8..idx1 * 8 + 8].copy_from_slice(&tmp);
        s.apply_keystream(&mut d);
        i += 2;
    }
    d
}

fn be64(mem: &[u8], word: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&mem[word * 8..word * 8 + 8]);
    u64::from_be_bytes(b)
}

/// True for addresses no node may have: zero, or a first byte of 0xff.
pub fn is_reserved(address: Address) -> bool {
    let v = address.to_u64();
    v == 0 || (v >> 32) == 0xff
}

fn address_from_digest(d: &[u8; 64]) -> Address {
    let mut a = [0u8; 5];
    a.copy_from_slice(&d[59..64]);
    Address::from_bytes(a)
}

fn public_from_secret(secret: &[u8; SECRET_KEY_LEN]) -> [u8; PUBLIC_KEY_LEN] {
    let mut x = [0u8; 32];
    x.copy_from_slice(&secret[..32]);
    let xs = x25519_dalek::StaticSecret::from(x);
    x.zeroize();
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&secret[32..]);
    let sk = SigningKey::from_bytes(&seed);
    seed.zeroize();
    let mut p = [0u8; 64];
    p[..32].copy_from_slice(x25519_dalek::PublicKey::from(&xs).as_bytes());
    p[32..].copy_from_slice(sk.verifying_key().as_bytes());
    p
}

/// ZeroTier signature with a bare 64-byte secret key (used for world signing keys).
pub fn sign_with_secret_key(secret: &[u8; SECRET_KEY_LEN], msg: &[u8]) -> [u8; SIGNATURE_LEN] {
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&secret[32..]);
    let sk = SigningKey::from_bytes(&seed);
    seed.zeroize();
    let digest = Sha512::digest(msg);
    let m = &digest[..32];
    let sig = sk.sign(m);
    let mut out = [0u8; SIGNATURE_LEN];
    out[..64].copy_from_slice(&sig.to_bytes());
    out[64..].copy_from_slice(m);
    out
}

/// Verifies a ZeroTier signature against a bare 64-byte public key.
pub fn verify_with_public_key(public: &[u8; PUBLIC_KEY_LEN], msg: &[u8], signature: &[u8]) -> bool {
    if signature.len() != SIGNATURE_LEN {
        return false;
    }
    let digest = Sha512::digest(msg);
    let m = &digest[..32];
    if !ct_eq(&signature[64..], m) {
        return false;
    }
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&public[32..]);
    let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let mut sb = [0u8; 64];
    sb.copy_from_slice(&signature[..64]);
    vk.verify(m, &Signature::from_bytes(&sb)).is_ok()
}

/// Makes a fresh signing key pair (public, secret) of the identity key format, without an
/// address; used for world `updatesMustBeSignedBy` keys.
pub fn generate_key_pair() -> Result<([u8; PUBLIC_KEY_LEN], [u8; SECRET_KEY_LEN]), IdentityError> {
    let mut secret = [0u8; SECRET_KEY_LEN];
    getrandom::fill(&mut secret).map_err(|_| IdentityError::Random)?;
    Ok((public_from_secret(&secret), secret))
}

/// The public key belonging to a 64-byte secret key.
pub fn public_key_of(secret: &[u8; SECRET_KEY_LEN]) -> [u8; PUBLIC_KEY_LEN] {
    public_from_secret(secret)
}

fn hex_decode_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn hex_push(out: &mut String, bytes: &[u8]) {
    const H: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(H[(b >> 4) as usize] as char);
        out.push(H[(b & 15) as usize] as char);
    }
}

impl Identity {
    /// Generates a new identity, checking `cancel` between hash attempts.
    ///
    /// Takes on the order of 15 memory-hard hashes; run it on a thread of your own.
    pub fn generate(cancel: &AtomicBool) -> Result<Identity, IdentityError> {
        let mut mem = vec![0u8; HASH_MEMORY];
        let mut secret = Secret([0u8; SECRET_KEY_LEN]);
        getrandom::fill(&mut secret.0).map_err(|_| IdentityError::Random)?;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(IdentityError::Cancelled);
            }
            getrandom::fill(&mut secret.0[..32]).map_err(|_| IdentityError::Random)?;
            let public = public_from_secret(&secret.0);
            let d = memory_hard_digest_with(&public, &mut mem);
            if d[0] >= 17 {
                continue;
            }
            let address = address_from_digest(&d);
            if is_reserved(address) {
                continue;
            }
            return Ok(Identity {
                address,
                public,
                secret: Some(secret),
            });
        }
    }

    /// Builds an identity from a 64-byte secret key, computing its public key and address
    /// (the result validates only if the key happens to satisfy the hash condition).
    pub fn from_secret_key(secret: &[u8; SECRET_KEY_LEN]) -> Result<Identity, IdentityError> {
        let public = public_from_secret(secret);
        let address = address_from_digest(&memory_hard_digest(&public));
        if is_reserved(address) {
            return Err(IdentityError::ReservedAddress);
        }
        Ok(Identity {
            address,
            public,
            secret: Some(Secret(*secret)),
        })
    }

    /// Builds a public identity from an address and public key without validating them.
    pub fn from_public_parts(
        address: Address,
        public: [u8; PUBLIC_KEY_LEN],
    ) -> Result<Identity, IdentityError> {
        if is_reserved(address) {
            return Err(IdentityError::ReservedAddress);
        }
        Ok(Identity {
            address,
            public,
            secret: None,
        })
    }

    /// The 40-bit address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// The 64-byte public key (X25519 ‖ Ed25519).
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public
    }

    /// Whether the secret key is present.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// A copy of this identity without its secret key.
    pub fn to_public(&self) -> Identity {
        Identity {
            address: self.address,
            public: self.public,
            secret: None,
        }
    }

    /// Checks that the address is not reserved and is the memory-hard hash of the public
    /// key (spec 3.3). Costs one 2 MiB hash; does not check the secret key.
    pub fn locally_validate(&self) -> bool {
        if is_reserved(self.address) {
            return false;
        }
        let d = memory_hard_digest(&self.public);
        d[0] < 17 && address_from_digest(&d) == self.address
    }

    /// The secret text form `address:0:public:secret`, or `None` without a secret.
    pub fn to_secret_string(&self) -> Option<String> {
        let s = self.secret.as_ref()?;
        let mut out = self.to_string();
        out.push(':');
        hex_push(&mut out, &s.0);
        Some(out)
    }

    /// Binary form (spec 3.6): 71 bytes, or 135 with the secret if asked and present.
    pub fn to_bytes(&self, include_secret: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(BINARY_SECRET_LEN);
        self.write_bytes(include_secret, &mut v);
        v
    }

    /// Appends the binary form to `out`.
    pub fn write_bytes(&self, include_secret: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.address.to_bytes());
        out.push(0);
        out.extend_from_slice(&self.public);
        match (&self.secret, include_secret) {
            (Some(s), true) => {
                out.push(SECRET_KEY_LEN as u8);
                out.extend_from_slice(&s.0);
            }
            _ => out.push(0),
        }
    }

    /// Parses a binary identity from the start of `b`; returns it and the bytes used.
    pub fn from_bytes(b: &[u8]) -> Result<(Identity, usize), IdentityError> {
        if b.len() < BINARY_PUBLIC_LEN {
            return Err(IdentityError::Binary("too short"));
        }
        let mut a = [0u8; 5];
        a.copy_from_slice(&b[..5]);
        let address = Address::from_bytes(a);
        if b[5] != 0 {
            return Err(IdentityError::Binary("unknown identity type"));
        }
        let mut public = [0u8; PUBLIC_KEY_LEN];
        public.copy_from_slice(&b[6..70]);
        let secret = match b[70] {
            0 => None,
            64 => {
                let s = b
                    .get(71..135)
                    .ok_or(IdentityError::Binary("truncated secret"))?;
                let mut sk = Secret([0u8; SECRET_KEY_LEN]);
                sk.0.copy_from_slice(s);
                Some(sk)
            }
            _ => return Err(IdentityError::Binary("bad secret length")),
        };
        if is_reserved(address) {
            return Err(IdentityError::ReservedAddress);
        }
        let used = if secret.is_some() { 135 } else { 71 };
        Ok((
            Identity {
                address,
                public,
                secret,
            },
            used,
        ))
    }

    /// Signs `msg` the ZeroTier way: Ed25519 over SHA-512(msg)[0..32], then that digest
    /// half appended (96 bytes).
    pub fn sign(&self, msg: &[u8]) -> Result<[u8; SIGNATURE_LEN], IdentityError> {
        let s = self.secret.as_ref().ok_or(IdentityError::NoSecret)?;
        Ok(sign_with_secret_key(&s.0, msg))
    }

    /// Verifies a 96-byte ZeroTier signature of `msg`. Any other length is refused.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        verify_with_public_key(&self.public, msg, signature)
    }

    /// Agrees on the long-term symmetric key with `other` (spec 4): SHA-512 of the X25519
    /// shared secret, first 48 bytes, plus the derived AES keys.
    pub fn agree(&self, other: &Identity) -> Result<SymmetricKey, IdentityError> {
        let raw = self.agree_raw(other)?;
        let mut h = Sha512::digest(raw);
        let mut k = [0u8; SYMMETRIC_KEY_LEN];
        k.copy_from_slice(&h[..SYMMETRIC_KEY_LEN]);
        h.as_mut_slice().zeroize();
        let key = SymmetricKey::new(k);
        k.zeroize();
        Ok(key)
    }

    /// The 64-byte agreement output (SHA-512 of the raw X25519 secret), as in 1.x's
    /// `C25519::agree` with a 64-byte output buffer.
    pub fn agree_64(&self, other: &Identity) -> Result<[u8; 64], IdentityError> {
        let raw = self.agree_raw(other)?;
        let mut out = [0u8; 64];
        out.copy_from_slice(&Sha512::digest(raw));
        Ok(out)
    }

    fn agree_raw(&self, other: &Identity) -> Result<[u8; 32], IdentityError> {
        let s = self.secret.as_ref().ok_or(IdentityError::NoSecret)?;
        let mut x = [0u8; 32];
        x.copy_from_slice(&s.0[..32]);
        let xs = x25519_dalek::StaticSecret::from(x);
        x.zeroize();
        let mut p = [0u8; 32];
        p.copy_from_slice(&other.public[..32]);
        Ok(xs
            .diffie_hellman(&x25519_dalek::PublicKey::from(p))
            .to_bytes())
    }
}

impl fmt::Display for Identity {
    /// The public text form `address:0:public`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(141);
        s.push_str(&self.address.to_string());
        s.push_str(":0:");
        hex_push(&mut s, &self.public);
        f.write_str(&s)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses `address:0:public[:secret]` (strict: exact field lengths, lowercase or
    /// uppercase hex). Does not validate the address/key binding.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 383 {
            return Err(IdentityError::Syntax("too long"));
        }
        let fields: Vec<&str> = s.trim().split(':').collect();
        if fields.len() < 3 || fields.len() > 4 {
            return Err(IdentityError::Syntax("expected 3 or 4 fields"));
        }
        let address: Address = fields[0]
            .parse()
            .map_err(|_| IdentityError::Syntax("bad address"))?;
        if fields[1] != "0" {
            return Err(IdentityError::Syntax("identity type must be 0"));
        }
        let public: [u8; PUBLIC_KEY_LEN] =
            hex_decode_exact(fields[2]).ok_or(IdentityError::Syntax("bad public key"))?;
        let secret = match fields.get(3) {
            Some(f) => Some(Secret(
                hex_decode_exact(f).ok_or(IdentityError::Syntax("bad secret key"))?,
            )),
            None => None,
        };
        if is_reserved(address) {
            return Err(IdentityError::ReservedAddress);
        }
        Ok(Identity {
            address,
            public,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_validates_signs_and_agrees() {
        let cancel = AtomicBool::new(false);
        let a = Identity::generate(&cancel).unwrap();
        let b = Identity::generate(&cancel).unwrap();
        assert!(a.locally_validate());
        let sig = a.sign(b"hello").unwrap();
        assert!(a.to_public().verify(b"hello", &sig));
        assert!(!a.verify(b"hellp", &sig));
        assert_eq!(
            a.agree(&b.to_public()).unwrap().as_bytes(),
            b.agree(&a.to_public()).unwrap().as_bytes()
        );
        let text = a.to_secret_string().unwrap();
        let back: Identity = text.parse().unwrap();
        assert!(back.has_secret());
        assert_eq!(back, a);
        let (bin, used) = Identity::from_bytes(&a.to_bytes(true)).unwrap();
        assert_eq!(used, 135);
        assert_eq!(bin.to_secret_string().unwrap(), text);
    }

    #[test]
    fn cancelled_generation_stops() {
        let cancel = AtomicBool::new(true);
        assert_eq!(
            Identity::generate(&cancel).unwrap_err(),
            IdentityError::Cancelled
        );
    }

    #[test]
    fn reserved_addresses() {
        for (a, r) in [
            ("0000000000", true),
            ("ff00000000", true),
            ("ffffffffff", true),
            ("fe12345678", false),
        ] {
            assert_eq!(is_reserved(a.parse().unwrap()), r);
        }
    }
}
