//! Node vouches: a host's signed statement that a member identity is one of its pods.
//!
//! A flatwire agent gives every pod its own identity. The controller cannot know those
//! identities in advance, so the agent signs a [`Vouch`] with its host identity over the pod's
//! member address, the network, the pod and a timestamp, and the pod's member sends it in the
//! metadata of its config requests under [`METADATA_KEY`]. The controller authorizes the member
//! when the vouch verifies against the pinned identity of a host that is itself an authorized
//! member of the same network (see `Controller::handle_request`) and, on a network with
//! `vouchRequiresPod`, a pod binding places that pod on that host (see
//! [`crate::controller::PodBinding`]).
//!
//! Wire form (all integers big-endian): version `1`, host address (5 bytes), member address (5),
//! network ID (8), timestamp in ms (8, signed), pod length (2) and pod bytes (UTF-8, at most
//! [`MAX_POD_LEN`]), then the host's 96-byte signature over [`SIGNING_CONTEXT`] followed by
//! everything before the signature.
//!
//! # Release
//!
//! A pod's identity is discarded when the pod goes, so nothing would ever free the IPs of its
//! member on a controller that no operator tidies up. Before the agent removes a pod member it
//! sends the controller one more config request whose metadata also carries [`RELEASE_KEY`]
//! (sent again after 200 and 600 ms; the member gives up after [`RELEASE_TIMEOUT_MS`]). The
//! controller deletes the requester's own member record (and so frees its IPs) when that
//! record was authorized by a vouch (`lastAuthorizedCredentialType` `"vouch"`) and answers
//! ERROR `OBJ_NOT_FOUND` for the network, which acknowledges the release; any other member is
//! kept and answered ERROR `ACCESS_DENIED` (see `Controller::handle_request`). The record
//! deleted is always the requester's own: VL1 authenticates its address and the record pins its
//! identity; the vouch itself is not consulted (it may be older than [`MAX_SKEW_MS`]).

use flatwire_vl1::{Address, Identity};

use crate::NetworkId;

/// The request-metadata key carrying an encoded vouch (a flatwire extension; ZeroTier One
/// ignores keys it does not know).
pub const METADATA_KEY: &str = "fwvouch";
/// The request-metadata key asking the controller to delete the requester's member (see
/// [Release](self#release); a flatwire extension, its value is `1`).
pub const RELEASE_KEY: &str = "fwleave";
/// How long a member waits for the controller to acknowledge its release (ms).
pub const RELEASE_TIMEOUT_MS: i64 = 1000;
/// When a member sends its release request, in ms after the first send (the first at 0).
pub const RELEASE_SENDS_MS: [i64; 3] = [0, 200, 600];
/// Longest pod identifier, in bytes.
pub const MAX_POD_LEN: usize = 512;
/// Domain separation prefix of the signed message.
pub const SIGNING_CONTEXT: &[u8] = b"flatwire vouch v1\0";
/// How far a vouch's timestamp may be from the controller's clock (ms), either way.
pub const MAX_SKEW_MS: i64 = 10 * 60 * 1000;

const VERSION: u8 = 1;
const SIGNATURE_LEN: usize = 96;
const FIXED_LEN: usize = 1 + 5 + 5 + 8 + 8 + 2;

/// Why a vouch was not made, not decoded or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VouchError {
    /// The host identity has no secret key to sign with.
    #[error("the host identity has no secret key; it cannot sign a vouch")]
    NoSecret,
    /// The pod identifier is empty or longer than [`MAX_POD_LEN`].
    #[error("the pod identifier must be 1 to {MAX_POD_LEN} bytes, got {0}")]
    PodLength(usize),
    /// The encoded form is truncated, has trailing bytes or an unknown version.
    #[error("malformed vouch: {0}")]
    Malformed(&'static str),
    /// The vouch names another member than the one presenting it.
    #[error("the vouch is for member {vouched}, presented by {presenter}")]
    WrongMember {
        /// The member address in the vouch.
        vouched: Address,
        /// Who presented it.
        presenter: Address,
    },
    /// The vouch is for another network.
    #[error("the vouch is for network {0}")]
    WrongNetwork(NetworkId),
    /// The timestamp is too far from the controller's clock.
    #[error("the vouch's timestamp is {0} ms away from now")]
    Stale(i64),
    /// The host that signed is not an authorized member of the network with a known identity.
    #[error("host {0} is not an authorized member of the network")]
    UntrustedHost(Address),
    /// The signature does not verify against the host's identity.
    #[error("bad signature by host {0}")]
    BadSignature(Address),
    /// The network requires a pod binding (`vouchRequiresPod`) and none exists for this pod
    /// (`namespace/name/uid`), e.g. the API server does not know the pod or it is gone.
    #[error("no pod binding for pod {0:?} on this network")]
    NoPodBinding(String),
    /// The pod's binding places it on another host than the one that vouched.
    #[error("pod {pod:?} runs on host {bound}, not on {host}")]
    WrongHost {
        /// The pod.
        pod: String,
        /// The host that vouched.
        host: Address,
        /// The host of the pod's binding.
        bound: String,
    },
    /// The same host already vouched for this pod as another member, at the same time or later.
    #[error("replayed vouch: host {host} vouched for pod {pod} as member {member} already")]
    Replayed {
        /// The host.
        host: Address,
        /// The pod.
        pod: String,
        /// The member the pod is bound to.
        member: Address,
    },
}

/// A host's signed statement that `member` is its pod `pod` on network `nwid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vouch {
    /// The vouching host's address.
    pub host: Address,
    /// The pod's member address.
    pub member: Address,
    /// The network.
    pub nwid: NetworkId,
    /// When it was signed (ms since the Unix epoch).
    pub timestamp: i64,
    /// The pod (e.g. `namespace/name/uid`).
    pub pod: String,
    signature: [u8; SIGNATURE_LEN],
}

fn signed_part(
    host: Address,
    member: Address,
    nwid: NetworkId,
    timestamp: i64,
    pod: &str,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(FIXED_LEN + pod.len() + SIGNATURE_LEN);
    b.push(VERSION);
    b.extend_from_slice(&host.to_bytes());
    b.extend_from_slice(&member.to_bytes());
    b.extend_from_slice(&nwid.to_bytes());
    b.extend_from_slice(&timestamp.to_be_bytes());
    b.extend_from_slice(&(pod.len() as u16).to_be_bytes());
    b.extend_from_slice(pod.as_bytes());
    b
}

fn signing_message(signed: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, signed].concat()
}

impl Vouch {
    /// Signs a vouch with `host` (which must hold its secret) for `member` as pod `pod` on
    /// `nwid` at `timestamp` (ms).
    pub fn sign(
        host: &Identity,
        member: Address,
        nwid: NetworkId,
        pod: &str,
        timestamp: i64,
    ) -> Result<Self, VouchError> {
        if pod.is_empty() || pod.len() > MAX_POD_LEN {
            return Err(VouchError::PodLength(pod.len()));
        }
        let signed = signed_part(host.address(), member, nwid, timestamp, pod);
        let signature = host
            .sign(&signing_message(&signed))
            .map_err(|_| VouchError::NoSecret)?;
        Ok(Self {
            host: host.address(),
            member,
            nwid,
            timestamp,
            pod: pod.to_owned(),
            signature,
        })
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = signed_part(self.host, self.member, self.nwid, self.timestamp, &self.pod);
        b.extend_from_slice(&self.signature);
        b
    }

    /// Parses the wire form (the signature is checked by [`Vouch::verify`]).
    pub fn decode(b: &[u8]) -> Result<Self, VouchError> {
        if b.len() < FIXED_LEN + SIGNATURE_LEN {
            return Err(VouchError::Malformed("truncated"));
        }
        if b[0] != VERSION {
            return Err(VouchError::Malformed("unknown version"));
        }
        let addr = |at: usize| {
            let mut x = [0u8; Address::LEN];
            x.copy_from_slice(&b[at..at + Address::LEN]);
            Address::from_bytes(x)
        };
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(x)
        };
        let pod_len = usize::from(u16::from_be_bytes([b[27], b[28]]));
        if pod_len == 0 || pod_len > MAX_POD_LEN {
            return Err(VouchError::PodLength(pod_len));
        }
        if b.len() != FIXED_LEN + pod_len + SIGNATURE_LEN {
            return Err(VouchError::Malformed(
                "length does not match the pod length",
            ));
        }
        let pod = std::str::from_utf8(&b[FIXED_LEN..FIXED_LEN + pod_len])
            .map_err(|_| VouchError::Malformed("pod is not UTF-8"))?;
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&b[FIXED_LEN + pod_len..]);
        Ok(Self {
            host: addr(1),
            member: addr(6),
            nwid: NetworkId::from(u64_at(11)),
            timestamp: u64_at(19) as i64,
            pod: pod.to_owned(),
            signature,
        })
    }

    /// Checks that this vouch lets `presenter` onto `nwid` at `now` (ms), signed by `host`
    /// (the host's identity as the controller knows it).
    pub fn verify(
        &self,
        host: &Identity,
        presenter: Address,
        nwid: NetworkId,
        now: i64,
    ) -> Result<(), VouchError> {
        if self.member != presenter {
            return Err(VouchError::WrongMember {
                vouched: self.member,
                presenter,
            });
        }
        if self.nwid != nwid {
            return Err(VouchError::WrongNetwork(self.nwid));
        }
        let skew = now.saturating_sub(self.timestamp);
        if skew.saturating_abs() > MAX_SKEW_MS {
            return Err(VouchError::Stale(skew));
        }
        let signed = signed_part(self.host, self.member, self.nwid, self.timestamp, &self.pod);
        if host.address() != self.host || !host.verify(&signing_message(&signed), &self.signature) {
            return Err(VouchError::BadSignature(self.host));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn ident() -> Identity {
        Identity::generate(&AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn round_trip_and_checks() {
        let host = ident();
        let pod = ident();
        let nwid = NetworkId::from(0x1122_3344_5500_0001);
        let v = Vouch::sign(&host, pod.address(), nwid, "default/web/uid-1", 5_000).unwrap();
        let back = Vouch::decode(&v.encode()).unwrap();
        assert_eq!(back, v);
        let public = host.to_public();
        assert_eq!(back.verify(&public, pod.address(), nwid, 6_000), Ok(()));

        let other = ident();
        assert!(matches!(
            back.verify(&public, other.address(), nwid, 6_000),
            Err(VouchError::WrongMember { .. })
        ));
        assert_eq!(
            back.verify(&public, pod.address(), NetworkId::from(1), 6_000),
            Err(VouchError::WrongNetwork(nwid))
        );
        assert!(matches!(
            back.verify(&public, pod.address(), nwid, 5_000 + MAX_SKEW_MS + 1),
            Err(VouchError::Stale(_))
        ));
        assert_eq!(
            back.verify(&other.to_public(), pod.address(), nwid, 6_000),
            Err(VouchError::BadSignature(host.address()))
        );
        let mut bytes = v.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            Vouch::decode(&bytes)
                .unwrap()
                .verify(&public, pod.address(), nwid, 6_000),
            Err(VouchError::BadSignature(host.address()))
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let host = ident();
        let nwid = NetworkId::from(7);
        assert_eq!(
            Vouch::sign(&host, host.address(), nwid, "", 0),
            Err(VouchError::PodLength(0))
        );
        assert_eq!(
            Vouch::sign(&host.to_public(), host.address(), nwid, "p", 0),
            Err(VouchError::NoSecret)
        );
        let good = Vouch::sign(&host, host.address(), nwid, "p", 0)
            .unwrap()
            .encode();
        for n in 0..good.len() {
            assert!(Vouch::decode(&good[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Vouch::decode(&long).is_err());
        let mut v2 = good;
        v2[0] = 2;
        assert_eq!(
            Vouch::decode(&v2),
            Err(VouchError::Malformed("unknown version"))
        );
    }
}
