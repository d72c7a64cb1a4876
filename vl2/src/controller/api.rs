//! API writes (`POST /controller/network/<nwid>` and `.../member/<address>` bodies):
//! a partial JSON object is merged into the stored object, checked, and stored only
//! when every check passes. A refused body gets an [`ApiError`] and changes nothing.

use std::fmt;
use std::net::IpAddr;

use flatwire_vl1::{Address, Identity};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::logic::parse_cidr;
use super::{Controller, ControllerStore, Member, Network, Pool, StoreError};
use crate::NetworkId;
use crate::rules::{MAX_CAPABILITY_RULES, MAX_RULES};

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;
/// Most capabilities, tags, routes or pools a network may define (ZeroTier's limits
/// for what fits in a config).
pub const MAX_NETWORK_ITEMS: usize = 128;
/// Most addresses an IPv4 pool may hold (a /8).
pub const MAX_V4_POOL: u64 = 1 << 24;
/// Most entries in a member's `ipAssignments` (what fits in a config).
pub const MAX_MEMBER_IPS: usize = 32;

/// What is wrong with an IP assignment pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolProblem {
    /// An end is not an IP address.
    NotAnAddress,
    /// One end is IPv4, the other IPv6.
    MixedFamilies,
    /// The start is after the end.
    Inverted,
    /// An IPv4 pool of more than [`MAX_V4_POOL`] addresses.
    TooLarge,
}

impl fmt::Display for PoolProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAnAddress => "an end is not an IP address",
            Self::MixedFamilies => "the ends are of different address families",
            Self::Inverted => "the start is after the end",
            Self::TooLarge => "more than 2^24 IPv4 addresses",
        })
    }
}

/// Why an API write was refused; the store is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is larger than [`MAX_BODY`].
    #[error("request body of {size} bytes exceeds {max}")]
    TooLarge {
        /// Body size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not JSON.
    #[error("request body is not JSON: {0}")]
    Syntax(String),
    /// The body is JSON but not an object.
    #[error("request body is not a JSON object")]
    NotAnObject,
    /// A field has the wrong type or a value it may not hold.
    #[error("field {field}: {reason}")]
    Field {
        /// The field (JSON name).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A list is longer than allowed.
    #[error("{what}: {count} entries, at most {max}")]
    TooMany {
        /// The list.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An IP assignment pool is unusable.
    #[error("IP pool {start}-{end}: {problem}")]
    Pool {
        /// `ipRangeStart`.
        start: String,
        /// `ipRangeEnd`.
        end: String,
        /// What is wrong.
        problem: PoolProblem,
    },
    /// An id field names another object, or the network is not this controller's.
    #[error("{0} does not match the object addressed")]
    IdMismatch(&'static str),
    /// A member was posted to a network that does not exist.
    #[error("network {0} does not exist")]
    NoSuchNetwork(NetworkId),
    /// The body sets an `identity` other than the one the member has pinned already.
    #[error("member {0} has another identity pinned; delete the member to change it")]
    IdentityPinned(Address),
    /// The body gives an existing pod binding (of this uid) other `ipAssignments` than it
    /// has.
    #[error(
        "pod binding {0}: ipAssignments of an existing binding are set by the controller; \
         delete the binding to reserve other IPs"
    )]
    PodIpsSetByController(String),
    /// Storage failed (nothing or the whole object was written).
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(super) fn field(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError::Field {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

pub(super) fn too_many(what: &'static str, count: usize, max: usize) -> Result<(), ApiError> {
    if count > max {
        Err(ApiError::TooMany { what, count, max })
    } else {
        Ok(())
    }
}

pub(super) fn parse_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::TooLarge {
            size: body.len(),
            max: MAX_BODY,
        });
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::NotAnObject),
        Err(e) => Err(ApiError::Syntax(e.to_string())),
    }
}

/// `body[key]`, if present, must be the string form of `want`.
pub(super) fn check_id<T: std::str::FromStr + PartialEq>(
    body: &Map<String, Value>,
    key: &'static str,
    want: T,
) -> Result<(), ApiError> {
    match body.get(key) {
        None => Ok(()),
        Some(Value::String(s)) if s.parse::<T>().is_ok_and(|v| v == want) => Ok(()),
        Some(Value::String(_)) => Err(ApiError::IdMismatch(key)),
        Some(_) => Err(field(key, "not a string")),
    }
}

/// Fields the API does not write (ZeroTier ignores them too).
const READ_ONLY: &[&str] = &[
    "id",
    "nwid",
    "address",
    "objtype",
    "revision",
    "creationTime",
];

/// `current` with the body's fields replaced. A field of the wrong type is named.
pub(super) fn merge<T: Serialize + DeserializeOwned>(
    current: &T,
    body: &Map<String, Value>,
) -> Result<T, ApiError> {
    let base = match serde_json::to_value(current) {
        Ok(Value::Object(m)) => m,
        _ => return Err(StoreError::Json("object does not serialize".into()).into()),
    };
    let with = |keys: &mut dyn Iterator<Item = (&String, &Value)>| {
        let mut obj = base.clone();
        for (k, v) in keys.filter(|(k, _)| !READ_ONLY.contains(&k.as_str())) {
            obj.insert(k.clone(), v.clone());
        }
        serde_json::from_value::<T>(Value::Object(obj))
    };
    with(&mut body.iter()).map_err(|e| {
        // Name the first field that fails on its own.
        let culprit = body
            .iter()
            .find(|kv| with(&mut std::iter::once(*kv)).is_err())
            .map_or("?", |(k, _)| k.as_str());
        field(culprit, e.to_string())
    })
}

fn check_rules(what: &'static str, rules: &[Value], max: usize) -> Result<(), ApiError> {
    too_many(what, rules.len(), max)?;
    for (i, r) in rules.iter().enumerate() {
        if !r.get("type").is_some_and(Value::is_string) {
            return Err(field(
                "rules",
                format!("{what}[{i}] is not an object with a string \"type\""),
            ));
        }
    }
    Ok(())
}

fn check_pool(p: &Pool) -> Result<(), ApiError> {
    let err = |problem| ApiError::Pool {
        start: p.ip_range_start.clone(),
        end: p.ip_range_end.clone(),
        problem,
    };
    let (Ok(s), Ok(e)) = (
        p.ip_range_start.parse::<IpAddr>(),
        p.ip_range_end.parse::<IpAddr>(),
    ) else {
        return Err(err(PoolProblem::NotAnAddress));
    };
    match (s, e) {
        (IpAddr::V4(s), IpAddr::V4(e)) => {
            let (s, e) = (u32::from(s), u32::from(e));
            if s > e {
                Err(err(PoolProblem::Inverted))
            } else if u64::from(e - s) + 1 > MAX_V4_POOL {
                Err(err(PoolProblem::TooLarge))
            } else {
                Ok(())
            }
        }
        (IpAddr::V6(s), IpAddr::V6(e)) if s > e => Err(err(PoolProblem::Inverted)),
        (IpAddr::V6(_), IpAddr::V6(_)) => Ok(()),
        _ => Err(err(PoolProblem::MixedFamilies)),
    }
}

/// Checks the network fields present in the request body.
fn check_network(n: &Network, body: &Map<String, Value>) -> Result<(), ApiError> {
    let has = |k: &str| body.contains_key(k);
    if has("mtu") && !(1280..=10000).contains(&n.mtu) {
        return Err(field("mtu", format!("{} is outside 1280..=10000", n.mtu)));
    }
    if has("multicastLimit") && n.multicast_limit < 0 {
        return Err(field("multicastLimit", "negative"));
    }
    if has("rules") {
        check_rules("rules", &n.rules, MAX_RULES)?;
    }
    if has("capabilities") {
        too_many("capabilities", n.capabilities.len(), MAX_NETWORK_ITEMS)?;
        for c in &n.capabilities {
            if !c.get("id").is_some_and(Value::is_u64) {
                return Err(field("capabilities", "a capability without a numeric id"));
            }
            match c.get("rules") {
                None | Some(Value::Null) => {}
                Some(Value::Array(r)) => check_rules("capability rules", r, MAX_CAPABILITY_RULES)?,
                Some(_) => return Err(field("capabilities", "rules is not an array")),
            }
        }
    }
    if has("tags") {
        too_many("tags", n.tags.len(), MAX_NETWORK_ITEMS)?;
        for t in &n.tags {
            if !t.get("id").is_some_and(Value::is_u64)
                || !t.get("default").is_none_or(|d| d.is_u64() || d.is_null())
            {
                return Err(field("tags", "a tag without a numeric id and default"));
            }
        }
    }
    if has("routes") {
        too_many("routes", n.routes.len(), MAX_NETWORK_ITEMS)?;
        for r in &n.routes {
            let Some((target, _)) = parse_cidr(&r.target) else {
                return Err(field(
                    "routes",
                    format!("target {:?} is not a CIDR", r.target),
                ));
            };
            if let Some(via) = &r.via
                && !via
                    .parse::<IpAddr>()
                    .is_ok_and(|v| v.is_ipv4() == target.is_ipv4())
            {
                return Err(field("routes", format!("via {via:?} is not a gateway")));
            }
        }
    }
    if has("ipAssignmentPools") {
        too_many(
            "ipAssignmentPools",
            n.ip_assignment_pools.len(),
            MAX_NETWORK_ITEMS,
        )?;
        n.ip_assignment_pools.iter().try_for_each(check_pool)?;
    }
    Ok(())
}

/// Checks the member fields present in the request body.
fn check_member(m: &Member, body: &Map<String, Value>) -> Result<(), ApiError> {
    let has = |k: &str| body.contains_key(k);
    if has("ipAssignments") {
        too_many("ipAssignments", m.ip_assignments.len(), MAX_MEMBER_IPS)?;
        if let Some(bad) = m
            .ip_assignments
            .iter()
            .find(|s| s.parse::<IpAddr>().is_err())
        {
            return Err(field("ipAssignments", format!("{bad:?} is not an IP")));
        }
    }
    if has("capabilities") {
        too_many("capabilities", m.capabilities.len(), MAX_NETWORK_ITEMS)?;
    }
    if has("tags") {
        too_many("tags", m.tags.len(), MAX_NETWORK_ITEMS)?;
    }
    if has("identity")
        && let Some(id) = &m.identity
    {
        match id.parse::<Identity>() {
            Ok(i) if i.address().to_string() == m.id => {}
            Ok(_) => return Err(field("identity", "belongs to another address")),
            Err(e) => return Err(field("identity", e.to_string())),
        }
    }
    Ok(())
}

impl<S: ControllerStore> Controller<S> {
    /// Applies a network POST body (call for every API write of a network; creates the
    /// network with defaults if it is new). Returns the stored network.
    pub fn api_network_post(
        &mut self,
        nwid: NetworkId,
        body: &[u8],
        now: i64,
    ) -> Result<Network, ApiError> {
        let body = parse_body(body)?;
        if nwid.controller() != self.identity().address() {
            return Err(ApiError::IdMismatch("controller address"));
        }
        check_id(&body, "id", nwid)?;
        check_id(&body, "nwid", nwid)?;
        let current = self
            .store()
            .get_network(nwid)?
            .unwrap_or_else(|| Network::new(nwid, now));
        let mut n = merge(&current, &body)?;
        check_network(&n, &body)?;
        self.store_mut().put_network(&mut n)?;
        Ok(n)
    }

    /// Applies a member POST body (call for every API write of a member; creates the
    /// member if it is new). Authorizing records `api` as the credential type. `identity`
    /// (a public identity string of this address) pins the member's identity when it has
    /// none yet; a different one than the pinned identity is refused
    /// ([`ApiError::IdentityPinned`]).
    pub fn api_member_post(
        &mut self,
        nwid: NetworkId,
        address: Address,
        body: &[u8],
        now: i64,
    ) -> Result<Member, ApiError> {
        let body = parse_body(body)?;
        check_id(&body, "nwid", nwid)?;
        check_id(&body, "id", address)?;
        check_id(&body, "address", address)?;
        let Some(network) = self.store().get_network(nwid)? else {
            return Err(ApiError::NoSuchNetwork(nwid));
        };
        let current = self
            .store()
            .get_member(nwid, address)?
            .unwrap_or_else(|| Member::new(nwid, address, now));
        let mut m = merge(&current, &body)?;
        check_member(&m, &body)?;
        if body.contains_key("identity") {
            // Pinned in its canonical (public) form; a pinned identity never changes here.
            let given = m
                .identity
                .as_deref()
                .and_then(|s| s.parse::<Identity>().ok())
                .map(|i| i.to_string());
            if let Some(pinned) = &current.identity
                && given.as_ref() != Some(pinned)
            {
                return Err(ApiError::IdentityPinned(address));
            }
            m.identity = given;
        }
        if m.authorized && !current.authorized {
            m.last_authorized_time = now;
            m.last_authorized_credential_type = Some("api".into());
            m.last_authorized_credential = None;
        } else if !m.authorized && current.authorized {
            m.last_deauthorized_time = now;
        }
        self.store_mut().put_member(&mut m)?;
        if m.ip_assignments != current.ip_assignments
            && let Some(b) = self.binding_of(&network, nwid, &m)?
        {
            self.record_in_binding(nwid, b, &m)?;
        }
        Ok(m)
    }
}
