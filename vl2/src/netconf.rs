//! The network configuration a controller sends a member (`NetworkConfig`), its
//! dictionary form, ad-hoc configs, and the chunked NETWORK_CONFIG delivery.

use std::net::{IpAddr, Ipv4Addr};

use flatwire_vl1::{Address, Identity};

use crate::codec::{CodecError, Reader};
use crate::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, SIGNATURE_LEN, SignError, Tag,
};
use crate::dictionary::Dictionary;
use crate::ip::{InetAddress, sixplane};
use crate::rules::{MAX_RULES, Rule, RuleKind, decode_rules, encode_rules, rules_from_json};
use crate::{AdHoc, NetworkId};

/// Config flag: broadcast enabled.
pub const FLAG_ENABLE_BROADCAST: u64 = 0x2;
/// Config flag: IPv6 NDP emulation for RFC4193/6PLANE.
pub const FLAG_NDP_EMULATION: u64 = 0x4;
/// Default MTU.
pub const DEFAULT_MTU: u32 = 2800;
/// Version written in `v`.
pub const CONFIG_VERSION: u64 = 7;
/// Maximum bytes of one config chunk.
pub const MAX_CHUNK: usize = 9740;
/// Specialist role: active bridge.
pub const SPECIALIST_ACTIVE_BRIDGE: u64 = 0x0000_0200_0000_0000;

/// Why a config could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A binary field did not decode.
    #[error("config field {0}: {1}")]
    Field(&'static str, CodecError),
    /// A required key is missing or invalid.
    #[error("config key {0} missing or invalid")]
    Missing(&'static str),
    /// The config is older than version 6.
    #[error("config version {0} is too old")]
    TooOld(u64),
}

/// A managed route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Target network (port = prefix bits).
    pub target: InetAddress,
    /// Gateway, if any.
    pub via: Option<InetAddress>,
    /// Flags (0).
    pub flags: u16,
    /// Metric (0).
    pub metric: u16,
}

/// DNS settings pushed by the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    /// Search domain (at most 127 bytes).
    pub domain: String,
    /// Up to 4 servers.
    pub servers: Vec<IpAddr>,
}

/// SSO settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sso {
    /// Version (0 or 1).
    pub version: u64,
    /// Enabled.
    pub enabled: bool,
    /// v0 authentication URL.
    pub authentication_url: String,
    /// v0 expiry.
    pub authentication_expiry_time: i64,
    /// v1 issuer URL.
    pub issuer_url: String,
    /// v1 central endpoint.
    pub central_endpoint_url: String,
    /// v1 nonce.
    pub nonce: String,
    /// v1 state.
    pub state: String,
    /// v1 client id.
    pub client_id: String,
    /// v1 provider.
    pub provider: String,
}

/// A member's network configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Network.
    pub network_id: NetworkId,
    /// Controller time of issue (ms).
    pub timestamp: i64,
    /// Credential time max delta (ms).
    pub credential_time_max_delta: i64,
    /// Revision.
    pub revision: u64,
    /// The member this config is for.
    pub issued_to: Address,
    /// Remote trace target (zero = none).
    pub remote_trace_target: Address,
    /// Remote trace level.
    pub remote_trace_level: u64,
    /// Flags (`FLAG_*`).
    pub flags: u64,
    /// Multicast limit.
    pub multicast_limit: u64,
    /// True for a private network (type 0).
    pub private: bool,
    /// Name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// The member's certificate of membership.
    pub com: Option<CertificateOfMembership>,
    /// Capabilities, sorted by id.
    pub capabilities: Vec<Capability>,
    /// Tags, sorted by id.
    pub tags: Vec<Tag>,
    /// Certificates of ownership.
    pub certificates_of_ownership: Vec<CertificateOfOwnership>,
    /// Specialists: role bits | address.
    pub specialists: Vec<u64>,
    /// Routes.
    pub routes: Vec<Route>,
    /// Static IPs (port = netmask bits).
    pub static_ips: Vec<InetAddress>,
    /// Base rules.
    pub rules: Vec<Rule>,
    /// DNS.
    pub dns: Dns,
    /// SSO.
    pub sso: Sso,
}

fn blob<T>(
    d: &Dictionary,
    key: &'static str,
    max: usize,
    mut f: impl FnMut(&mut Reader<'_>) -> Result<T, CodecError>,
) -> Result<Vec<T>, ConfigError> {
    let mut out = Vec::new();
    if let Some(v) = d.get(key) {
        let mut r = Reader::new(v);
        while r.remaining() > 0 && out.len() < max {
            out.push(f(&mut r).map_err(|e| ConfigError::Field(key, e))?);
        }
    }
    Ok(out)
}

impl NetworkConfig {
    /// Whether `address` is listed as an active bridge.
    pub fn is_active_bridge(&self, address: Address) -> bool {
        self.specialists
            .iter()
            .any(|s| s & 0xff_ffff_ffff == address.to_u64() && s & SPECIALIST_ACTIVE_BRIDGE != 0)
    }

    /// The local tag value of `id`.
    pub fn tag(&self, id: u32) -> Option<u32> {
        self.tags.iter().find(|t| t.id == id).map(|t| t.value)
    }

    /// The dictionary the controller sends (`toDictionary` key order).
    pub fn to_dictionary(&self) -> Dictionary {
        let mut d = Dictionary::new();
        d.add_u64("v", CONFIG_VERSION);
        d.add_u64("nwid", self.network_id.to_u64());
        d.add_u64("ts", self.timestamp as u64);
        d.add_u64("ctmd", self.credential_time_max_delta as u64);
        d.add_u64("r", self.revision);
        d.add_str("id", &self.issued_to.to_string());
        d.add_str("tt", &self.remote_trace_target.to_string());
        d.add_u64("tl", self.remote_trace_level);
        d.add_u64("f", self.flags);
        d.add_u64("ml", self.multicast_limit);
        d.add_u64("t", if self.private { 0 } else { 1 });
        d.add_str("n", &self.name);
        d.add_u64("mtu", u64::from(self.mtu));
        if let Some(c) = &self.com {
            let mut b = Vec::new();
            c.encode(&mut b);
            d.add("C", &b);
        }
        let mut put = |key: &str, b: Vec<u8>| {
            if !b.is_empty() {
                d.add(key, &b);
            }
        };
        let mut b = Vec::new();
        self.capabilities.iter().for_each(|c| c.encode(&mut b));
        put("CAP", b);
        let mut b = Vec::new();
        self.tags.iter().for_each(|t| t.encode(&mut b));
        put("TAG", b);
        let mut b = Vec::new();
        self.certificates_of_ownership
            .iter()
            .for_each(|t| t.encode(&mut b));
        put("COO", b);
        let mut b = Vec::new();
        self.specialists
            .iter()
            .for_each(|s| b.extend_from_slice(&s.to_be_bytes()));
        put("S", b);
        let mut b = Vec::new();
        for r in &self.routes {
            r.target.encode(&mut b);
            InetAddress::encode_opt(r.via.as_ref(), &mut b);
            b.extend_from_slice(&r.flags.to_be_bytes());
            b.extend_from_slice(&r.metric.to_be_bytes());
        }
        put("RT", b);
        let mut b = Vec::new();
        self.static_ips.iter().for_each(|i| i.encode(&mut b));
        put("I", b);
        let mut b = Vec::new();
        encode_rules(&self.rules, &mut b);
        put("R", b);
        let mut b = vec![0u8; 128];
        let dom = self.dns.domain.as_bytes();
        let n = dom.len().min(127);
        b[..n].copy_from_slice(&dom[..n]);
        for i in 0..4 {
            match self.dns.servers.get(i) {
                Some(ip) => InetAddress::new(*ip, 0).encode(&mut b),
                None => b.push(0),
            }
        }
        d.add("DNS", &b);
        let s = &self.sso;
        d.add_u64("ssov", s.version);
        d.add_bool("ssoe", s.enabled);
        if s.version == 0 {
            if s.enabled && !s.authentication_url.is_empty() {
                d.add_str("aurl", &s.authentication_url);
                d.add_u64("aexpt", s.authentication_expiry_time as u64);
            }
        } else if s.version == 1 {
            d.add_str("iurl", &s.issuer_url);
            d.add_str("ssoce", &s.central_endpoint_url);
            d.add_str("sson", &s.nonce);
            d.add_str("ssos", &s.state);
            d.add_str("ssocid", &s.client_id);
            d.add_str("ssop", &s.provider);
        }
        d
    }

    /// Serialized dictionary bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_dictionary().encode()
    }

    /// Reads a config from its dictionary (`fromDictionary`).
    pub fn from_dictionary(d: &Dictionary) -> Result<Self, ConfigError> {
        let v = d.get_u64("v", 0);
        if v < 6 {
            return Err(ConfigError::TooOld(v));
        }
        let nwid = d.get_u64("nwid", 0);
        if nwid == 0 {
            return Err(ConfigError::Missing("nwid"));
        }
        let addr = |k: &'static str| -> Result<Address, ConfigError> {
            let s = d.get_str(k).unwrap_or_default();
            Address::new(crate::jsonutil::parse_hex_u64(&s) & 0xff_ffff_ffff)
                .map_err(|_| ConfigError::Missing(k))
        };
        let issued_to = addr("id")?;
        if issued_to.to_u64() == 0 {
            return Err(ConfigError::Missing("id"));
        }
        let mut name = d.get("n").unwrap_or_default().to_vec();
        name.truncate(127);
        let mtu = d.get_u64("mtu", u64::from(DEFAULT_MTU)).clamp(1280, 10000) as u32;
        let com = match d.get("C") {
            Some(c) if !c.is_empty() => Some(
                CertificateOfMembership::decode(&mut Reader::new(c))
                    .map_err(|e| ConfigError::Field("C", e))?,
            ),
            _ => None,
        };
        // Like the reference, keep the capabilities and tags parsed before an error.
        let lenient = |key: &str, f: &mut dyn FnMut(&mut Reader<'_>) -> bool| {
            if let Some(v) = d.get(key) {
                let mut r = Reader::new(v);
                while r.remaining() > 0 && f(&mut r) {}
            }
        };
        let mut capabilities = Vec::new();
        lenient("CAP", &mut |r| match Capability::decode(r) {
            Ok(c) if capabilities.len() < 128 => {
                capabilities.push(c);
                true
            }
            _ => false,
        });
        capabilities.sort_by_key(|c| c.id);
        let mut tags = Vec::new();
        lenient("TAG", &mut |r| match Tag::decode(r) {
            Ok(t) if tags.len() < 128 => {
                tags.push(t);
                true
            }
            _ => false,
        });
        tags.sort_by_key(|t| t.id);
        let coos = blob(d, "COO", 4, CertificateOfOwnership::decode)?;
        let specialists = d
            .get("S")
            .map(|s| {
                s.chunks_exact(8)
                    .take(256)
                    .map(|c| c.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b)))
                    .collect()
            })
            .unwrap_or_default();
        let mut routes = Vec::new();
        if let Some(v) = d.get("RT") {
            let mut r = Reader::new(v);
            while r.remaining() > 0 && routes.len() < 128 {
                let e = |e| ConfigError::Field("RT", e);
                let target = InetAddress::decode(&mut r).map_err(e)?;
                let via = InetAddress::decode(&mut r).map_err(e)?;
                let flags = r.u16().map_err(e)?;
                let metric = r.u16().map_err(e)?;
                if let Some(target) = target {
                    routes.push(Route {
                        target,
                        via,
                        flags,
                        metric,
                    });
                }
            }
        }
        let static_ips = blob(d, "I", 32, InetAddress::decode)?
            .into_iter()
            .flatten()
            .collect();
        let rules = match d.get("R") {
            Some(v) => decode_rules(v, MAX_RULES).map_err(|e| ConfigError::Field("R", e))?,
            None => Vec::new(),
        };
        let mut dns = Dns::default();
        if let Some(v) = d.get("DNS") {
            let mut r = Reader::new(v);
            let dom = r.bytes(128).map_err(|e| ConfigError::Field("DNS", e))?;
            let end = dom.iter().take(127).position(|b| *b == 0).unwrap_or(127);
            dns.domain = String::from_utf8_lossy(&dom[..end]).into_owned();
            for _ in 0..4 {
                if r.remaining() == 0 {
                    break;
                }
                if let Some(a) =
                    InetAddress::decode(&mut r).map_err(|e| ConfigError::Field("DNS", e))?
                {
                    dns.servers.push(a.ip);
                }
            }
        }
        let s = |k: &str| d.get_str(k).unwrap_or_default();
        let sso_version = d.get_u64("ssov", 0);
        let sso = Sso {
            version: sso_version,
            enabled: d.get_bool("ssoe", false),
            authentication_url: s("aurl"),
            authentication_expiry_time: d.get_u64("aexpt", 0) as i64,
            issuer_url: s("iurl"),
            central_endpoint_url: s("ssoce"),
            nonce: s("sson"),
            state: s("ssos"),
            client_id: s("ssocid"),
            provider: match d.get_str("ssop") {
                Some(p) => p,
                None if sso_version == 1 => "default".into(),
                None => String::new(),
            },
        };
        Ok(Self {
            network_id: NetworkId::from(nwid),
            timestamp: d.get_u64("ts", 0) as i64,
            credential_time_max_delta: d.get_u64("ctmd", 0) as i64,
            revision: d.get_u64("r", 0),
            issued_to,
            remote_trace_target: addr("tt").unwrap_or_default(),
            remote_trace_level: d.get_u64("tl", 0),
            flags: d.get_u64("f", 0),
            multicast_limit: d.get_u64("ml", 0),
            private: d.get_u64("t", 0) == 0,
            name: String::from_utf8_lossy(&name).into_owned(),
            mtu,
            com,
            capabilities,
            tags,
            certificates_of_ownership: coos,
            specialists,
            routes,
            static_ips,
            rules,
            dns,
            sso,
        })
    }

    /// Parses serialized dictionary bytes.
    pub fn decode(data: &[u8]) -> Result<Self, ConfigError> {
        Self::from_dictionary(&Dictionary::parse(data))
    }

    /// The config a member synthesizes for an ad-hoc network, or `None` when the ID is
    /// not a usable ad-hoc ID (`Err` status NOT_FOUND is `Some(Err)`-free: a port range
    /// with end < start returns `None` too).
    pub fn adhoc(nwid: NetworkId, own: Address, now: i64) -> Option<Self> {
        let kind = nwid.adhoc()?;
        let six = InetAddress::new(IpAddr::V6(sixplane(nwid, own)), 40);
        let mut c = Self {
            network_id: nwid,
            timestamp: now,
            credential_time_max_delta: 7_200_000,
            revision: 1,
            issued_to: own,
            flags: FLAG_NDP_EMULATION,
            private: false,
            mtu: DEFAULT_MTU,
            ..Self::default()
        };
        match kind {
            AdHoc::PortRange { start, end } => {
                if end < start {
                    return None;
                }
                c.multicast_limit = 0;
                c.static_ips = vec![six];
                c.name = format!("adhoc-{start:04x}-{end:04x}");
                let json = serde_json::json!([
                    {"type": "MATCH_ETHERTYPE", "not": true, "etherType": 0x86dd},
                    {"type": "ACTION_DROP"},
                    {"type": "MATCH_IP_PROTOCOL", "ipProtocol": 58},
                    {"type": "ACTION_ACCEPT"},
                    {"type": "MATCH_IP_PROTOCOL", "ipProtocol": 17},
                    {"type": "MATCH_IP_PROTOCOL", "or": true, "ipProtocol": 6},
                    {"type": "MATCH_IP_DEST_PORT_RANGE", "start": start, "end": end},
                    {"type": "ACTION_ACCEPT"},
                    {"type": "MATCH_CHARACTERISTICS", "not": true, "mask": 2},
                    {"type": "ACTION_ACCEPT"},
                    {"type": "MATCH_CHARACTERISTICS", "mask": 2},
                    {"type": "MATCH_CHARACTERISTICS", "mask": 0x10},
                    {"type": "ACTION_ACCEPT"},
                    {"type": "ACTION_DROP"}
                ]);
                c.rules = rules_from_json(&json, MAX_RULES);
            }
            AdHoc::Ipv4 { first_octet, hub } => {
                let a = own.to_bytes();
                c.multicast_limit = 1024;
                c.rules = vec![Rule::new(RuleKind::Accept)];
                c.static_ips = vec![
                    six,
                    InetAddress::new(IpAddr::V4(Ipv4Addr::new(first_octet, a[2], a[3], a[4])), 8),
                ];
                c.name = format!("adhoc-{first_octet}.0.0.0");
                if hub.to_u64() != 0 {
                    c.specialists.push(hub.to_u64());
                }
            }
            AdHoc::Invalid => return None,
        }
        Some(c)
    }
}

/// One chunk of a NETWORK_CONFIG / OK(NETWORK_CONFIG_REQUEST) delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigChunk {
    /// Network.
    pub nwid: NetworkId,
    /// The chunk's bytes of the dictionary.
    pub data: Vec<u8>,
    /// Flags (0x01 fast propagate).
    pub flags: u8,
    /// Update id, same for all chunks of one update.
    pub update_id: u64,
    /// Total dictionary length.
    pub total_length: u32,
    /// Byte offset of this chunk.
    pub index: u32,
    /// Controller signature over [`ConfigChunk::signed_region`], `None` for legacy chunks.
    pub signature: Option<[u8; SIGNATURE_LEN]>,
}

impl ConfigChunk {
    /// The bytes the signature covers: nwid through chunk index.
    pub fn signed_region(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.data.len() + 30);
        b.extend_from_slice(&self.nwid.to_bytes());
        b.extend_from_slice(&(self.data.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.data);
        b.push(self.flags);
        b.extend_from_slice(&self.update_id.to_be_bytes());
        b.extend_from_slice(&self.total_length.to_be_bytes());
        b.extend_from_slice(&self.index.to_be_bytes());
        b
    }

    /// Cuts a serialized config into signed chunks.
    pub fn split(
        nwid: NetworkId,
        dict: &[u8],
        update_id: u64,
        signer: &Identity,
    ) -> Result<Vec<ConfigChunk>, SignError> {
        let mut out = Vec::new();
        let total = dict.len() as u32;
        let mut at = 0usize;
        loop {
            let end = (at + MAX_CHUNK).min(dict.len());
            let mut c = ConfigChunk {
                nwid,
                data: dict[at..end].to_vec(),
                flags: 0,
                update_id,
                total_length: total,
                index: at as u32,
                signature: None,
            };
            c.signature = Some(signer.sign(&c.signed_region())?);
            out.push(c);
            at = end;
            if at >= dict.len() {
                break;
            }
        }
        Ok(out)
    }

    /// The wire body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.nwid.to_bytes());
        b.extend_from_slice(&(self.data.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.data);
        if let Some(sig) = &self.signature {
            b.push(self.flags);
            b.extend_from_slice(&self.update_id.to_be_bytes());
            b.extend_from_slice(&self.total_length.to_be_bytes());
            b.extend_from_slice(&self.index.to_be_bytes());
            b.push(1);
            b.extend_from_slice(&(SIGNATURE_LEN as u16).to_be_bytes());
            b.extend_from_slice(sig);
        }
        b
    }

    /// Parses a wire body. `legacy_packet_id` is used as update id for unsigned chunks.
    pub fn decode(body: &[u8], legacy_packet_id: u64) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        let nwid = NetworkId::from(r.u64()?);
        let n = r.u16()? as usize;
        let data = r.bytes(n)?.to_vec();
        if r.remaining() == 0 {
            return Ok(Self {
                nwid,
                total_length: n as u32,
                data,
                flags: 0,
                update_id: legacy_packet_id,
                index: 0,
                signature: None,
            });
        }
        let flags = r.u8()?;
        let update_id = r.u64()?;
        let total_length = r.u32()?;
        let index = r.u32()?;
        if u64::from(index) + n as u64 > u64::from(total_length) {
            return Err(CodecError::Invalid("chunk beyond total length".into()));
        }
        if r.u8()? != 1 || r.u16()? as usize != SIGNATURE_LEN {
            return Err(CodecError::Invalid("chunk signature type".into()));
        }
        Ok(Self {
            nwid,
            data,
            flags,
            update_id,
            total_length,
            index,
            signature: Some(r.array()?),
        })
    }

    /// Verifies the chunk signature against the controller identity.
    pub fn verify(&self, controller: &Identity) -> bool {
        controller.address() == self.nwid.controller()
            && self
                .signature
                .is_some_and(|s| controller.verify(&self.signed_region(), &s))
    }
}
