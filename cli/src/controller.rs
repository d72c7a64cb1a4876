//! `flatwire controller network|member ...`: the agent's network controller (`--controller`),
//! through its ZeroTier-shaped controller API (`/controller/network/...`).

use std::net::IpAddr;
use std::path::PathBuf;

use flatwire_vl1::Address;
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{Member, Network, Pool, RouteJson};
use flatwire_vl2::rules::compiler::compile;
use serde_json::{Map, Value, json};

use crate::client::{AgentArgs, CliError, Client};
use crate::table::{fields, pretty, table};

/// Controller commands.
#[derive(Debug, clap::Subcommand)]
pub enum ControllerCommand {
    /// Networks of this controller.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Members of this controller's networks.
    #[command(subcommand)]
    Member(MemberCommand),
}

/// `controller network ...`.
#[derive(Debug, clap::Subcommand)]
pub enum NetworkCommand {
    /// Create a network (refused if it exists). Without an ID, a free random one is taken.
    Create(CreateArgs),
    /// Show a network's settings.
    Show {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
    },
    /// List this controller's networks.
    List,
}

/// `controller network create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The network's name.
    #[arg(long)]
    name: Option<String>,
    /// An IP assignment pool, first and last address (repeatable); assigning from pools is
    /// turned on for the pools' address families.
    #[arg(long = "pool", value_name = "START-END", value_parser = parse_pool)]
    pools: Vec<Pool>,
    /// A managed route, its target as CIDR (repeatable), e.g. 10.77.0.0/24.
    #[arg(long = "route", value_name = "CIDR")]
    routes: Vec<String>,
    /// Members need authorization (the default).
    #[arg(long)]
    private: bool,
    /// Anyone may join without authorization.
    #[arg(long, conflicts_with = "private")]
    public: bool,
    /// Rules in ZeroTier's rule language, compiled as `flatwire rules compile` does (the
    /// default rule set accepts everything).
    #[arg(long, value_name = "FILE")]
    rules_file: Option<PathBuf>,
    /// The network ID (16 hex digits starting with this controller's address) or just its
    /// last 6 hex digits; default: a random free one.
    #[arg(value_name = "NWID|SUFFIX", value_parser = parse_new_id)]
    id: Option<NewId>,
}

/// The ID asked for by `create`.
#[derive(Debug, Clone, Copy)]
enum NewId {
    Full(NetworkId),
    Number(u32),
}

fn parse_new_id(s: &str) -> Result<NewId, String> {
    if s.len() == 6 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return u32::from_str_radix(s, 16)
            .map(NewId::Number)
            .map_err(|e| e.to_string());
    }
    s.parse::<NetworkId>()
        .map(NewId::Full)
        .map_err(|e| format!("{e} (or the 6 hex digits after this controller's address)"))
}

fn parse_pool(s: &str) -> Result<Pool, String> {
    let (start, end) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not START-END"))?;
    for ip in [start, end] {
        ip.parse::<IpAddr>()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
    }
    Ok(Pool {
        ip_range_start: start.to_owned(),
        ip_range_end: end.to_owned(),
    })
}

/// `controller member ...`.
#[derive(Debug, clap::Subcommand)]
pub enum MemberCommand {
    /// List a network's members.
    List {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
    },
    /// Show a member.
    Show {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
        /// The member's address: 10 hex digits.
        address: Address,
    },
    /// Authorize a member (one that has not asked yet is created, pre-authorized).
    Authorize {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
        /// The member's address: 10 hex digits.
        address: Address,
    },
    /// Take a member's authorization away.
    Deauthorize {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
        /// The member's address: 10 hex digits.
        address: Address,
    },
}

/// Runs a controller command; returns what to print.
pub fn run(agent: &AgentArgs, cmd: &ControllerCommand) -> Result<String, CliError> {
    match cmd {
        ControllerCommand::Network(NetworkCommand::Create(args)) => {
            let body = create_body(args)?;
            let c = controller(agent)?;
            create(&c, agent.json, args.id, body)
        }
        ControllerCommand::Network(NetworkCommand::Show { nwid }) => {
            let c = controller(agent)?;
            let v = c.get(&net_path(*nwid), &format!("network {nwid}"))?;
            output(&c, agent.json, &v, show_network)
        }
        ControllerCommand::Network(NetworkCommand::List) => {
            list_networks(&controller(agent)?, agent.json)
        }
        ControllerCommand::Member(MemberCommand::List { nwid }) => {
            list_members(&controller(agent)?, agent.json, *nwid)
        }
        ControllerCommand::Member(MemberCommand::Show { nwid, address }) => {
            let c = controller(agent)?;
            let v = c.get(&member_path(*nwid, *address), &member_what(*nwid, *address))?;
            output(&c, agent.json, &v, show_member)
        }
        ControllerCommand::Member(MemberCommand::Authorize { nwid, address }) => {
            authorize(&controller(agent)?, agent.json, *nwid, *address, true)
        }
        ControllerCommand::Member(MemberCommand::Deauthorize { nwid, address }) => {
            authorize(&controller(agent)?, agent.json, *nwid, *address, false)
        }
    }
}

/// A client for an agent that runs the controller.
fn controller(agent: &AgentArgs) -> Result<Client, CliError> {
    let c = Client::new(agent)?;
    c.require_controller()?;
    Ok(c)
}

fn net_path(nwid: NetworkId) -> String {
    format!("/controller/network/{nwid}")
}

fn member_path(nwid: NetworkId, address: Address) -> String {
    format!("/controller/network/{nwid}/member/{address}")
}

fn member_what(nwid: NetworkId, address: Address) -> String {
    format!("member {address} of network {nwid}")
}

/// `-j`: the JSON as it came; otherwise `human(v)`.
fn output(
    c: &Client,
    json: bool,
    v: &Value,
    human: fn(&Value) -> Result<String, String>,
) -> Result<String, CliError> {
    if json {
        return Ok(pretty(v));
    }
    human(v).map_err(|reason| c.bad_answer(reason))
}

/// The POST body of `create`, checked before anything is sent.
fn create_body(args: &CreateArgs) -> Result<Value, CliError> {
    let mut body = Map::new();
    if let Some(name) = &args.name {
        body.insert("name".into(), json!(name));
    }
    body.insert("private".into(), json!(!args.public));
    if !args.pools.is_empty() {
        let family = |v4: bool| {
            args.pools.iter().any(|p| {
                p.ip_range_start
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_ipv4() == v4)
            })
        };
        body.insert("ipAssignmentPools".into(), json!(args.pools));
        if family(true) {
            body.insert("v4AssignMode".into(), json!({ "zt": true }));
        }
        if family(false) {
            body.insert("v6AssignMode".into(), json!({ "zt": true }));
        }
    }
    if !args.routes.is_empty() {
        let routes: Vec<RouteJson> = args
            .routes
            .iter()
            .map(|t| RouteJson {
                target: t.clone(),
                via: None,
            })
            .collect();
        body.insert("routes".into(), json!(routes));
    }
    if let Some(file) = &args.rules_file {
        let src = std::fs::read(file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
        let compiled = compile(&src)
            .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?
            .to_cli_json()
            .to_value();
        for key in ["rules", "capabilities", "tags"] {
            body.insert(key.into(), compiled["config"][key].clone());
        }
        body.insert("rulesSource".into(), json!(src));
    }
    Ok(Value::Object(body))
}

fn create(c: &Client, json: bool, id: Option<NewId>, body: Value) -> Result<String, CliError> {
    let status = c.get("/status", "status")?;
    let ours: Address = status["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| c.bad_answer(format!("/status has no address: {status}")))?;
    let nwid = match id {
        Some(NewId::Full(n)) if n.controller() != ours => {
            return Err(CliError::Usage(format!(
                "network {n} belongs to controller {}, but this agent is {ours}: \
                 its networks are {ours}xxxxxx",
                n.controller()
            )));
        }
        Some(NewId::Full(n)) => n,
        Some(NewId::Number(x)) => NetworkId::new(ours, x),
        None => free_id(c, ours)?,
    };
    let path = net_path(nwid);
    let what = format!("network {nwid}");
    let existing = c.request("GET", &path, None)?;
    if existing.status == 200 {
        return Err(CliError::Conflict(format!(
            "network {nwid} already exists (see `flatwire controller network show {nwid}`)"
        )));
    }
    let v = c.post(&path, &body, &what)?;
    output(c, json, &v, show_network).map(|shown| {
        if json {
            shown
        } else {
            format!("created network {nwid}\n{shown}")
        }
    })
}

/// A random network number of this controller that is not taken.
fn free_id(c: &Client, ours: Address) -> Result<NetworkId, CliError> {
    let taken = c.get("/controller/network", "networks")?;
    let taken: Vec<&str> = taken
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    loop {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).map_err(|e| CliError::Usage(format!("no randomness: {e}")))?;
        let id = NetworkId::new(ours, u32::from_be_bytes(b));
        if id.number() != 0 && !taken.contains(&id.to_string().as_str()) {
            return Ok(id);
        }
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn or_dash(items: Vec<String>, sep: &str) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(sep)
    }
}

fn pools(n: &Network) -> String {
    or_dash(
        n.ip_assignment_pools
            .iter()
            .map(|p| format!("{}-{}", p.ip_range_start, p.ip_range_end))
            .collect(),
        ", ",
    )
}

fn routes(n: &Network) -> String {
    or_dash(
        n.routes
            .iter()
            .map(|r| match &r.via {
                Some(via) => format!("{} via {via}", r.target),
                None => r.target.clone(),
            })
            .collect(),
        ", ",
    )
}

fn network(v: &Value) -> Result<Network, String> {
    serde_json::from_value(v.clone()).map_err(|e| format!("not a controller network: {e}"))
}

fn show_network(v: &Value) -> Result<String, String> {
    let n = network(v)?;
    let mut assign = Vec::new();
    if n.v4_assign_mode.zt {
        assign.push("IPv4 from pools");
    }
    if n.v6_assign_mode.zt {
        assign.push("IPv6 from pools");
    }
    if n.v6_assign_mode.rfc4193 {
        assign.push("IPv6 RFC4193");
    }
    if n.v6_assign_mode.sixplane {
        assign.push("IPv6 6PLANE");
    }
    Ok(fields(&[
        ("id", n.id.clone()),
        (
            "name",
            if n.name.is_empty() {
                "-".into()
            } else {
                n.name.clone()
            },
        ),
        ("type", if n.private { "PRIVATE" } else { "PUBLIC" }.into()),
        ("pools", pools(&n)),
        ("routes", routes(&n)),
        (
            "assign",
            or_dash(assign.iter().map(|s| (*s).to_owned()).collect(), ", "),
        ),
        ("mtu", n.mtu.to_string()),
        ("broadcast", yes(n.enable_broadcast)),
        ("multicast limit", n.multicast_limit.to_string()),
        (
            "rules",
            format!(
                "{} rules, {} capabilities, {} tags",
                n.rules.len(),
                n.capabilities.len(),
                n.tags.len()
            ),
        ),
        ("revision", n.revision.to_string()),
    ]))
}

fn list_networks(c: &Client, json: bool) -> Result<String, CliError> {
    let ids = c.get("/controller/network", "networks")?;
    if json {
        return Ok(pretty(&ids));
    }
    let mut rows = Vec::new();
    for id in ids
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let v = c.get(
            &format!("/controller/network/{id}"),
            &format!("network {id}"),
        )?;
        let n = network(&v).map_err(|reason| c.bad_answer(reason))?;
        rows.push([
            n.id.clone(),
            if n.name.is_empty() {
                "-".into()
            } else {
                n.name.clone()
            },
            if n.private { "PRIVATE" } else { "PUBLIC" }.into(),
            pools(&n),
            routes(&n),
        ]);
    }
    if rows.is_empty() {
        return Ok("no networks on this controller\n".into());
    }
    Ok(table(["NWID", "NAME", "TYPE", "POOLS", "ROUTES"], &rows))
}

fn member(v: &Value) -> Result<Member, String> {
    serde_json::from_value(v.clone()).map_err(|e| format!("not a controller member: {e}"))
}

fn version(m: &Member) -> String {
    if m.v_major < 0 {
        "-".into()
    } else {
        format!("{}.{}.{}", m.v_major, m.v_minor, m.v_rev)
    }
}

fn show_member(v: &Value) -> Result<String, String> {
    let m = member(v)?;
    let how = m
        .last_authorized_credential_type
        .as_deref()
        .map(|t| format!(" (by {t})"))
        .unwrap_or_default();
    Ok(fields(&[
        ("address", m.address.clone()),
        ("network", m.nwid.clone()),
        (
            "name",
            m.name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "authorized",
            if m.authorized {
                format!("yes{how}")
            } else {
                "no".into()
            },
        ),
        ("ips", or_dash(m.ip_assignments.clone(), ", ")),
        (
            "tags",
            or_dash(
                m.tags.iter().map(|(id, v)| format!("{id}={v}")).collect(),
                ", ",
            ),
        ),
        (
            "capabilities",
            or_dash(
                m.capabilities.iter().map(ToString::to_string).collect(),
                ", ",
            ),
        ),
        ("active bridge", yes(m.active_bridge)),
        ("no auto IPs", yes(m.no_auto_assign_ips)),
        ("version", version(&m)),
        ("revision", m.revision.to_string()),
    ]))
}

fn list_members(c: &Client, json: bool, nwid: NetworkId) -> Result<String, CliError> {
    let v = c.get(
        &format!("{}/member", net_path(nwid)),
        &format!("network {nwid}"),
    )?;
    if json {
        return Ok(pretty(&v));
    }
    let mut rows = Vec::new();
    for a in v.as_object().into_iter().flat_map(|o| o.keys()) {
        let Ok(address) = a.parse::<Address>() else {
            continue;
        };
        let mv = c.get(&member_path(nwid, address), &member_what(nwid, address))?;
        let m = member(&mv).map_err(|reason| c.bad_answer(reason))?;
        rows.push([
            m.address.clone(),
            yes(m.authorized),
            or_dash(m.ip_assignments.clone(), ","),
            version(&m),
            m.name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    if rows.is_empty() {
        return Ok(format!("no members in network {nwid}\n"));
    }
    Ok(table(
        ["ADDRESS", "AUTHORIZED", "IPS", "VERSION", "NAME"],
        &rows,
    ))
}

fn authorize(
    c: &Client,
    json: bool,
    nwid: NetworkId,
    address: Address,
    authorized: bool,
) -> Result<String, CliError> {
    let path = member_path(nwid, address);
    let what = member_what(nwid, address);
    if !authorized {
        // Deauthorizing a member that never asked would create it: refuse with the 404.
        c.get(&path, &what)?;
    }
    let v = c.post(&path, &json!({ "authorized": authorized }), &what)?;
    let verb = if authorized {
        "authorized"
    } else {
        "deauthorized"
    };
    output(c, json, &v, show_member).map(|shown| {
        if json {
            shown
        } else {
            format!("{verb} {address} on {nwid}\n{shown}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_full_ids_or_suffixes() {
        assert!(matches!(parse_new_id("00002a"), Ok(NewId::Number(42))));
        assert!(matches!(
            parse_new_id("8056c2e21c000001"),
            Ok(NewId::Full(n)) if n.number() == 1
        ));
        assert!(parse_new_id("8056c2e21c").is_err());
        assert!(parse_new_id("zz002a").is_err());
    }

    #[test]
    fn pools_are_two_addresses() {
        let p = parse_pool("10.0.0.10-10.0.0.99").unwrap();
        assert_eq!(
            (p.ip_range_start.as_str(), p.ip_range_end.as_str()),
            ("10.0.0.10", "10.0.0.99")
        );
        assert!(parse_pool("fd00::1-fd00::ff").is_ok());
        assert!(parse_pool("10.0.0.10").is_err());
        assert!(parse_pool("10.0.0.10-x").is_err());
    }
}
