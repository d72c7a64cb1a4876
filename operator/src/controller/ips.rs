//! IP assignments kept in the API server, so that a controller whose store is lost (a leader
//! failover starts a fresh controller) gives members their old addresses back.
//!
//! The controller's IPs of a pod's member (its binding's `ipAssignments`) and of a node's
//! host member are written onto the Pod and the Node as the annotation
//! [`annotation_key`]`(nwid)` = `flatwire.io/ips.<16-hex network ID>`, a comma-separated list
//! ([`annotation_value`]); a NetworkMember keeps them in `status.assignedIPs`. When the
//! operator creates a binding or member the controller lacks, it sends them back as
//! `ipAssignments` (checked by [`parse_ips`] first: a bad value is ignored with a Warning
//! Event).

use std::net::IpAddr;

use flatwire_vl2::controller::MAX_MEMBER_IPS;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// What the annotation names start with; the network ID (16 hex digits) follows.
pub const ANNOTATION_PREFIX: &str = "flatwire.io/ips.";

/// The annotation holding the IPs of a Pod's or Node's member on network `nwid`.
pub fn annotation_key(nwid: u64) -> String {
    format!("{ANNOTATION_PREFIX}{nwid:016x}")
}

/// The annotation value for `ips`: comma-separated, `None` (no annotation) when empty.
pub fn annotation_value(ips: &[String]) -> Option<String> {
    (!ips.is_empty()).then(|| ips.join(","))
}

/// Checks saved IPs: each must be an IP address (returned in canonical form, duplicates
/// dropped, order kept), at most as many as a controller member holds.
pub fn parse_ips<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut ips: Vec<String> = Vec::new();
    for item in items {
        let ip: IpAddr = item
            .trim()
            .parse()
            .map_err(|_| format!("{:?} is not an IP address", truncate(item)))?;
        let ip = ip.to_string();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
        if ips.len() > MAX_MEMBER_IPS {
            return Err(format!("more than {MAX_MEMBER_IPS} IP addresses"));
        }
    }
    Ok(ips)
}

/// Parses an annotation value (comma-separated IPs; blanks between commas are skipped).
pub fn parse_annotation(value: &str) -> Result<Vec<String>, String> {
    parse_ips(value.split(',').filter(|s| !s.trim().is_empty()))
}

/// The first 64 characters of `s` (for messages about hostile values).
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The `ipAssignments` of a controller member or pod binding (strings only).
pub fn assigned(v: &Value) -> Vec<String> {
    v.get("ipAssignments")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Sets annotation `key` of object `name` to `value` (`None`: removes it) with a merge
/// patch of that one key.
pub async fn annotate<K>(
    api: &Api<K>,
    name: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"metadata": {"annotations": {key: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_round_trip_and_bad_values_are_refused() {
        assert_eq!(
            annotation_key(0x89e9_2cee_e500_0007),
            "flatwire.io/ips.89e92ceee5000007"
        );
        let ips = vec!["198.19.0.12".to_owned(), "fd00::12".to_owned()];
        let v = annotation_value(&ips).unwrap();
        assert_eq!(v, "198.19.0.12,fd00::12");
        assert_eq!(parse_annotation(&v).unwrap(), ips);
        assert_eq!(annotation_value(&[]), None);
        // Canonical form, duplicates and blanks dropped.
        assert_eq!(
            parse_annotation(" fd00:0::12 , 198.19.0.12,,198.19.0.12").unwrap(),
            vec!["fd00::12", "198.19.0.12"]
        );
        let e = parse_annotation("198.19.0.12,not-an-ip").unwrap_err();
        assert!(e.contains("\"not-an-ip\""), "{e}");
        let e = parse_annotation("198.19.0.0/24").unwrap_err();
        assert!(e.contains("not an IP"), "{e}");
        let many: Vec<String> = (0..=MAX_MEMBER_IPS)
            .map(|i| format!("10.0.0.{i}"))
            .collect();
        let e = parse_annotation(&many.join(",")).unwrap_err();
        assert!(e.contains("more than 32"), "{e}");
        assert_eq!(
            parse_ips(many[..3].iter().map(String::as_str))
                .unwrap()
                .len(),
            3
        );
        let long = "x".repeat(10_000);
        assert!(parse_annotation(&long).unwrap_err().len() < 100);
        assert_eq!(
            assigned(&json!({"ipAssignments": ["198.19.0.12", 5]})),
            vec!["198.19.0.12"]
        );
        assert!(assigned(&json!({})).is_empty());
    }
}
