//! The `Network` reconciler: network ID, rules compilation, revision and conditions.
//!
//! [`desired_status`] is the pure core (object, controller address and `now` in, status out);
//! [`reconcile`] wraps it with the API server: it emits an Event when the rules stop
//! compiling and server-side applies the status with the field manager [`FIELD_MANAGER`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flatwire_vl2::rules::compiler::OJson;
use flatwire_vl2::rules::{MAX_CAPABILITY_RULES, MAX_RULES};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};

use super::{ControllerAddress, Error, FIELD_MANAGER, condition, lock, recorder};
use crate::crd::{Network, NetworkSpec, NetworkStatus, V4AssignMode, V6AssignMode};

/// Condition type: the rules source and every capability compiled.
pub const RULES_COMPILED: &str = "RulesCompiled";
/// Condition type: the network is configured and can be served to members.
pub const READY: &str = "Ready";
/// How often a healthy Network is reconciled again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// The first retry delay after a failed reconcile; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// The longest retry delay after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What a reconcile needs: the API client, the Event recorder and the controller address.
pub struct Context {
    client: Client,
    recorder: Recorder,
    address: ControllerAddress,
    /// Consecutive failures per Network name, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context whose Events are reported by `flatwire-operator` (instance: the hostname).
    pub fn new(client: Client, address: ControllerAddress) -> Self {
        Self {
            recorder: recorder(&client),
            client,
            address,
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// The network ID a Network gets under `address`, or why it gets none.
///
/// - `spec.number` `n`: `address << 24 | n`.
/// - `spec.id`: used as is when its top 40 bits are `address`.
/// - neither: the number already in `status.networkId` when it is under `address` (the API
///   server is the store, so it survives restarts), else one derived from `metadata.uid`
///   (FNV-1a folded to 24 bits, never 0). Collisions with other Networks are not yet detected.
pub fn network_id(address: ControllerAddress, net: &Network) -> Result<u64, String> {
    let prefix = address.as_u64() << 24;
    if let Some(n) = net.spec.number {
        if n > 0xff_ffff {
            return Err(format!("number {n} does not fit in 24 bits"));
        }
        return Ok(prefix | u64::from(n));
    }
    if let Some(id) = &net.spec.id {
        let v = u64::from_str_radix(id, 16)
            .ok()
            .filter(|_| id.len() == 16)
            .ok_or_else(|| format!("id {id:?} is not 16 hex digits"))?;
        if v >> 24 != address.as_u64() {
            return Err(format!(
                "id {id} is not under this operator's controller address {address}"
            ));
        }
        return Ok(v);
    }
    let kept = net
        .status
        .as_ref()
        .and_then(|s| s.network_id.as_deref())
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .filter(|v| v >> 24 == address.as_u64());
    if let Some(v) = kept {
        return Ok(v);
    }
    let uid = net.metadata.uid.as_deref().unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes().chain(net.name_any().bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let n = ((h >> 40) ^ (h >> 16) ^ h) & 0xff_ffff;
    Ok(prefix | n.max(1))
}

/// The error when `count` compiled rules exceed the `max` a network config carries.
fn too_many_rules(count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!(
            "the rules compile to {count} rules; a network config carries at most {max}"
        ));
    }
    Ok(())
}

/// The compiled rules in the controller's JSON form: the base rules and each capability's
/// `{id, default, rules}`. The error is the compiler's `line L column C: ...`, or that more
/// rules came out than a network config carries ([`MAX_RULES`], [`MAX_CAPABILITY_RULES`]),
/// prefixed with `capability NAME: ` for a capability (compiled on its own).
pub fn compiled_rules(spec: &NetworkSpec) -> Result<(Vec<Value>, Vec<Value>), String> {
    let to_values = |r: &[OJson]| r.iter().map(OJson::to_value).collect::<Vec<_>>();
    let base = spec.compile_rules().map_err(|e| e.to_string())?;
    too_many_rules(base.rules.len(), MAX_RULES)?;
    let mut caps = Vec::with_capacity(spec.capabilities.len());
    for cap in &spec.capabilities {
        let c = spec
            .compile_source(&cap.rules)
            .map_err(|e| format!("capability {}: {e}", cap.name))?;
        too_many_rules(c.rules.len(), MAX_CAPABILITY_RULES)
            .map_err(|e| format!("capability {}: {e}", cap.name))?;
        caps.push(json!({"id": cap.id, "default": false, "rules": to_values(&c.rules)}));
    }
    Ok((to_values(&base.rules), caps))
}

/// Compiles the rules source and every capability's rules ([`compiled_rules`]); `Ok` is a
/// summary for the `RulesCompiled` condition.
pub fn compile(spec: &NetworkSpec) -> Result<String, String> {
    let (base, caps) = compiled_rules(spec)?;
    Ok(format!("{} rules, {} capabilities", base.len(), caps.len()))
}

/// Checks that no two of the spec's IP assignment pools share an address (the API server
/// checks each pool on its own); the error names the first two that do.
pub fn check_pools(spec: &NetworkSpec) -> Result<(), String> {
    let as_int = |ip: IpAddr| match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    };
    let ranges: Vec<(usize, bool, u128, u128)> = spec
        .ip_assignment_pools
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let (v6, start) = as_int(p.ip_range_start.parse().ok()?);
            let (v6_end, end) = as_int(p.ip_range_end.parse().ok()?);
            (v6 == v6_end).then_some((i, v6, start, end))
        })
        .collect();
    for (n, a) in ranges.iter().enumerate() {
        if let Some(b) = ranges[n + 1..]
            .iter()
            .find(|b| a.1 == b.1 && a.2 <= b.3 && b.2 <= a.3)
        {
            let pool = |i: usize| {
                let p = &spec.ip_assignment_pools[i];
                format!("[{i}] ({}-{})", p.ip_range_start, p.ip_range_end)
            };
            return Err(format!(
                "ipAssignmentPools{} and {} overlap",
                pool(a.0),
                pool(b.0)
            ));
        }
    }
    Ok(())
}

/// The controller network object (a partial one: the fields the operator owns) for `net`,
/// or why it cannot be served: the rules compiler's error or overlapping pools
/// ([`check_pools`]). It sets `vouchRequiresPod`: a node's vouch admits a pod
/// only with a pod binding (see [`super::pod`]) placing the pod on that node.
pub fn desired_network(net: &Network) -> Result<Value, String> {
    let spec = &net.spec;
    let (rules, capabilities) = compiled_rules(spec)?;
    check_pools(spec)?;
    let tags: Vec<Value> = spec
        .tags
        .iter()
        .map(|t| json!({"id": t.id, "default": t.default}))
        .collect();
    let v6 = |m| spec.v6_assign_mode.contains(&m);
    Ok(json!({
        "name": spec.name.clone().unwrap_or_else(|| net.name_any()),
        "private": spec.private,
        "enableBroadcast": spec.enable_broadcast,
        "mtu": spec.mtu,
        "multicastLimit": spec.multicast_limit,
        "ipAssignmentPools": spec.ip_assignment_pools,
        "routes": spec.routes,
        "v4AssignMode": {"zt": spec.v4_assign_mode.contains(&V4AssignMode::Pool)},
        "v6AssignMode": {
            "zt": v6(V6AssignMode::Pool),
            "rfc4193": v6(V6AssignMode::Rfc4193),
            "6plane": v6(V6AssignMode::SixPlane),
        },
        "dns": spec.dns.as_ref().map_or_else(|| json!([]), |d| json!({"domain": d.domain, "servers": d.servers})),
        "rules": rules,
        "rulesSource": spec.rules.clone().unwrap_or_default(),
        "capabilities": capabilities,
        "tags": tags,
        // Pods get in only with a binding the pod reconciler wrote from the API server.
        "vouchRequiresPod": true,
    }))
}

/// The status the operator wants for `net` at `now`: the pure, idempotent core of the
/// reconciler. Conditions keep their `lastTransitionTime` while their status is unchanged;
/// `revision` is bumped when `metadata.generation` or the network ID changed since the
/// status was written. Member counts are left out: the pod binding pass writes them with a
/// field manager of their own (see [`super::counts`]), so this reconciler's server-side
/// apply neither removes nor claims them.
pub fn desired_status(address: ControllerAddress, net: &Network, now: Timestamp) -> NetworkStatus {
    let prev = net.status.clone().unwrap_or_default();
    let generation = net.metadata.generation;
    let id = network_id(address, net);
    let network_id = id.as_ref().ok().map(|v| format!("{v:016x}"));
    let changed = prev.observed_generation != generation || prev.network_id != network_id;
    let revision = match prev.revision {
        Some(r) if !changed => r,
        Some(r) => r.saturating_add(1),
        None => 1,
    };
    let cond = |t: &str, ok: bool, reason: &str, message: String| {
        condition(&prev.conditions, t, ok, reason, message, generation, now)
    };
    let compiled = compile(&net.spec);
    let rules = match &compiled {
        Ok(m) => cond(RULES_COMPILED, true, "Compiled", format!("compiled {m}")),
        Err(e) => cond(RULES_COMPILED, false, "SyntaxError", e.clone()),
    };
    let ready = match (&id, &compiled, check_pools(&net.spec)) {
        (Err(e), _, _) => cond(READY, false, "InvalidNetworkId", e.clone()),
        (_, Err(_), _) => cond(
            READY,
            false,
            RULES_NOT_COMPILED,
            "the rules do not compile (see RulesCompiled)".into(),
        ),
        (_, _, Err(e)) => cond(READY, false, "OverlappingPools", e),
        (Ok(_), Ok(_), Ok(())) => cond(READY, true, "Configured", "network configured".into()),
    };
    NetworkStatus {
        network_id,
        revision: Some(revision),
        observed_generation: generation,
        conditions: vec![rules, ready],
        members: None,
        authorized_members: None,
    }
}

/// The `Ready=False` reason when the rules do not compile.
const RULES_NOT_COMPILED: &str = "RulesNotCompiled";

/// The problem of `status` worth a Warning Event, as (reason, message): the compiler's error
/// (`SyntaxError`), else the reason and message of `Ready=False`.
fn problem(status: Option<&NetworkStatus>) -> Option<(&str, &str)> {
    let conds = &status?.conditions;
    let failed = |t: &str| conds.iter().find(|c| c.type_ == t && c.status == "False");
    match (failed(RULES_COMPILED), failed(READY)) {
        (Some(c), _) => Some(("SyntaxError", c.message.as_str())),
        (None, Some(c)) if c.reason != RULES_NOT_COMPILED => {
            Some((c.reason.as_str(), c.message.as_str()))
        }
        _ => None,
    }
}

/// Reconciles one Network: computes [`desired_status`], publishes a Warning Event when a
/// problem newly appears (or changes): `SyntaxError` when the rules fail to compile, else
/// `Ready=False`'s reason (`InvalidNetworkId`, `OverlappingPools`), and server-side applies
/// the status when its fields differ from the stored ones. Call it from the controller.
pub async fn reconcile(net: Arc<Network>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = net.metadata.name.clone().ok_or(Error::NoName)?;
    let status = desired_status(ctx.address, &net, Timestamp::now());
    if let Some((reason, msg)) = problem(Some(&status))
        && problem(net.status.as_ref()) != Some((reason, msg))
    {
        let note: String = msg.chars().take(1000).collect();
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "CompileRules".into(),
            secondary: None,
        };
        ctx.recorder.publish(&ev, &net.object_ref(&())).await?;
    }
    let stored = net.status.clone().map(|s| NetworkStatus {
        members: None,
        authorized_members: None,
        ..s
    });
    if stored.as_ref() != Some(&status) {
        let api: Api<Network> = Api::all(ctx.client.clone());
        let patch = serde_json::json!({
            "apiVersion": Network::api_version(&()),
            "kind": Network::kind(&()),
            "status": status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&name, &pp, &Patch::Apply(&patch)).await?;
    }
    lock(&ctx.failures).remove(&name);
    Ok(Action::requeue(RESYNC))
}

/// The retry after a failed reconcile: exponential backoff per Network, from 1 s to 5 min.
pub fn error_policy(net: Arc<Network>, err: &Error, ctx: Arc<Context>) -> Action {
    let name = net.name_any();
    let mut failures = lock(&ctx.failures);
    let n = failures.entry(name.clone()).or_insert(0);
    *n = n.saturating_add(1);
    let delay = backoff(*n);
    tracing::warn!(network = %name, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay before retry number `n` (1-based): 1 s, 2 s, 4 s, ... capped at 5 min.
pub fn backoff(n: u32) -> Duration {
    MIN_BACKOFF
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> ControllerAddress {
        "89e92ceee5".parse().unwrap()
    }

    fn net(spec: serde_json::Value) -> Network {
        let mut n = Network::new("lab", serde_json::from_value(spec).unwrap());
        n.metadata.generation = Some(1);
        n.metadata.uid = Some("0b7c0f1e-1111-2222-3333-444455556666".into());
        n
    }

    fn cond<'a>(
        s: &'a NetworkStatus,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn rules_name_the_networks_tags_and_keep_their_own_positions() {
        let spec = |rules: &str| {
            net(serde_json::json!({
                "tags": [
                    {"name": "role", "id": 100, "enum": {"web": 1, "db": 2, "not-a-name": 9},
                     "default": 2},
                    {"name": "app.kubernetes.io", "id": 7},
                ],
                "capabilities": [{"name": "ssh", "id": 1, "rules": "accept tseq role db;"}],
                "rules": rules,
            }))
            .spec
        };
        let (base, caps) =
            compiled_rules(&spec("drop tseq role web treq role db;\naccept;")).unwrap();
        assert_eq!(base[0]["type"], "MATCH_TAG_SENDER", "{base:?}");
        assert_eq!(
            (&base[0]["id"], &base[0]["value"]),
            (&json!(100), &json!(1))
        );
        assert_eq!(caps[0]["rules"][0]["value"], 2, "{caps:?}");
        let e = compiled_rules(&spec("accept;\ndrop tseq role nope;")).unwrap_err();
        assert!(e.starts_with("line 2 column "), "{e}");
        let e = compiled_rules(&spec("tag role id 5;\naccept;")).unwrap_err();
        assert!(e.starts_with("line 1 column "), "{e}");
        // A source within the API server's size limit that compiles to more rules than a
        // network config carries (each line: a match and an action).
        let line = "accept ethertype 2048;\n";
        let e = compiled_rules(&spec(&line.repeat(MAX_RULES / 2 + 1))).unwrap_err();
        assert_eq!(
            e,
            "the rules compile to 1026 rules; a network config carries at most 1024"
        );
        assert!(compiled_rules(&spec(&line.repeat(MAX_RULES / 2))).is_ok());
        let mut s = spec("accept;");
        s.capabilities[0].rules = line.repeat(MAX_CAPABILITY_RULES / 2 + 1);
        let e = compiled_rules(&s).unwrap_err();
        assert!(
            e.starts_with("capability ssh: the rules compile to 66 rules"),
            "{e}"
        );
    }

    #[test]
    fn ids_from_number_id_or_uid() {
        assert_eq!(
            network_id(addr(), &net(serde_json::json!({"number": 0x42}))),
            Ok(0x89e9_2cee_e500_0042)
        );
        assert_eq!(
            network_id(addr(), &net(serde_json::json!({"id": "89e92ceee5abcdef"}))),
            Ok(0x89e9_2cee_e5ab_cdef)
        );
        let e = network_id(addr(), &net(serde_json::json!({"id": "1111111111abcdef"})));
        assert!(e.unwrap_err().contains("89e92ceee5"));
        let n = net(serde_json::json!({}));
        let a = network_id(addr(), &n).unwrap();
        assert_eq!(a >> 24, addr().as_u64());
        assert_eq!(network_id(addr(), &n), Ok(a), "stable");
    }

    #[test]
    fn status_is_idempotent_and_bumps_revision_on_generation() {
        let mut n = net(serde_json::json!({"number": 1, "rules": "accept;"}));
        let now = Timestamp::now();
        let s1 = desired_status(addr(), &n, now);
        assert_eq!(s1.revision, Some(1));
        assert_eq!(s1.network_id.as_deref(), Some("89e92ceee5000001"));
        assert_eq!(cond(&s1, RULES_COMPILED).status, "True");
        assert_eq!(cond(&s1, READY).status, "True");
        n.status = Some(s1.clone());
        let later = now + k8s_openapi::jiff::SignedDuration::from_secs(60);
        assert_eq!(desired_status(addr(), &n, later), s1, "idempotent");

        n.metadata.generation = Some(2);
        n.spec.rules = Some("accept;\ndrop bogus;\n".into());
        let s2 = desired_status(addr(), &n, later);
        assert_eq!(s2.revision, Some(2));
        assert_eq!(s2.observed_generation, Some(2));
        let rc = cond(&s2, RULES_COMPILED);
        assert_eq!(
            (rc.status.as_str(), rc.reason.as_str()),
            ("False", "SyntaxError")
        );
        assert!(rc.message.starts_with("line 2 column "), "{}", rc.message);
        assert_ne!(
            rc.last_transition_time,
            cond(&s1, RULES_COMPILED).last_transition_time
        );
        assert_eq!(cond(&s2, READY).status, "False");
        assert_eq!(
            problem(Some(&s2)),
            Some(("SyntaxError", rc.message.as_str()))
        );
        assert_eq!(problem(Some(&s1)), None);
    }

    #[test]
    fn capability_errors_name_the_capability() {
        let n = net(
            serde_json::json!({"capabilities": [{"name": "su", "id": 1, "rules": "drop bogus;"}]}),
        );
        let s = desired_status(addr(), &n, Timestamp::now());
        let m = &cond(&s, RULES_COMPILED).message;
        assert!(m.starts_with("capability su: line 1 column "), "{m}");
    }

    #[test]
    fn controller_network_json() {
        let n = net(serde_json::json!({
            "number": 2, "name": "lab net", "private": false,
            "ipAssignmentPools": [{"ipRangeStart": "198.19.0.1", "ipRangeEnd": "198.19.0.254"}],
            "routes": [{"target": "198.19.0.0/24"}],
            "v4AssignMode": ["pool"], "v6AssignMode": ["rfc4193"],
            "tags": [{"name": "dept", "id": 1000, "default": 5}],
            "capabilities": [{"name": "su", "id": 1, "rules": "accept;"}],
            "rules": "drop not ethertype ipv4;\naccept;",
        }));
        let v = desired_network(&n).unwrap();
        assert_eq!(v["name"], "lab net");
        assert_eq!(v["private"], false);
        assert_eq!(v["v4AssignMode"], serde_json::json!({"zt": true}));
        assert_eq!(v["v6AssignMode"]["rfc4193"], true);
        assert_eq!(v["tags"], serde_json::json!([{"id": 1000, "default": 5}]));
        assert_eq!(v["capabilities"][0]["id"], 1);
        // match ethertype (negated), drop, accept.
        assert_eq!(v["rules"].as_array().unwrap().len(), 3);
        assert_eq!(v["dns"], serde_json::json!([]));
        // It is a valid vl2 controller network object.
        let mut full = v.clone();
        full["id"] = "89e92ceee5000002".into();
        full["nwid"] = "89e92ceee5000002".into();
        let cn: flatwire_vl2::controller::Network = serde_json::from_value(full).unwrap();
        assert_eq!(cn.ip_assignment_pools[0].ip_range_start, "198.19.0.1");
        assert_eq!(cn.routes[0].via, None);
        assert!(cn.extra.is_empty(), "{:?}", cn.extra);
        assert!(cn.vouch_requires_pod, "pods need a binding");
        let mut bad = n.clone();
        bad.spec.rules = Some("drop bogus;".into());
        assert!(
            desired_network(&bad)
                .unwrap_err()
                .starts_with("line 1 column")
        );
    }

    #[test]
    fn overlapping_pools_are_a_problem_of_their_own() {
        let pools = |p: serde_json::Value| net(json!({"number": 1, "ipAssignmentPools": p}));
        let ok = pools(json!([
            {"ipRangeStart": "10.0.0.1", "ipRangeEnd": "10.0.0.9"},
            {"ipRangeStart": "10.0.0.10", "ipRangeEnd": "10.0.1.0"},
            {"ipRangeStart": "fd00::1", "ipRangeEnd": "fd00::ffff"},
            {"ipRangeStart": "::ffff:10.0.0.5", "ipRangeEnd": "::ffff:10.0.0.5"},
        ]));
        assert_eq!(check_pools(&ok.spec), Ok(()));
        assert!(desired_network(&ok).is_ok());
        let bad = pools(json!([
            {"ipRangeStart": "fd00::1", "ipRangeEnd": "fd00::ffff"},
            {"ipRangeStart": "10.0.0.1", "ipRangeEnd": "10.0.0.9"},
            {"ipRangeStart": "10.0.0.9", "ipRangeEnd": "10.0.0.20"},
        ]));
        let e = check_pools(&bad.spec).unwrap_err();
        assert_eq!(
            e,
            "ipAssignmentPools[1] (10.0.0.1-10.0.0.9) and [2] (10.0.0.9-10.0.0.20) overlap"
        );
        assert_eq!(desired_network(&bad), Err(e.clone()));
        let s = desired_status(addr(), &bad, Timestamp::now());
        assert_eq!(cond(&s, RULES_COMPILED).status, "True");
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "OverlappingPools")
        );
        assert_eq!(problem(Some(&s)), Some(("OverlappingPools", e.as_str())));
        // A pool containing another one overlaps too.
        let inside = pools(json!([
            {"ipRangeStart": "fd00::1", "ipRangeEnd": "fd00::ffff"},
            {"ipRangeStart": "fd00::10", "ipRangeEnd": "fd00::20"},
        ]));
        assert!(check_pools(&inside.spec).is_err());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}
