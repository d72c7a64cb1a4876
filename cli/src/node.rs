//! `flatwire status|networks|peers|join|leave`: the local node, through the agent's API.

use flatwire_vl2::NetworkId;
use serde_json::{Value, json};

use crate::client::{AgentArgs, CliError, Client};
use crate::table::{fields, list, pretty, table};

/// Commands about the local node.
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Show the node: address, online state, version, planet, listening address.
    #[command(alias = "info")]
    Status,
    /// List the networks this node has joined.
    #[command(alias = "listnetworks")]
    Networks,
    /// List the peers this node knows, with their roles, latencies and paths.
    #[command(alias = "listpeers")]
    Peers,
    /// Join a network (remembered across agent restarts).
    Join {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
    },
    /// Leave a network (its device goes away; forgotten across restarts).
    Leave {
        /// The network ID: 16 hex digits.
        nwid: NetworkId,
    },
}

/// Runs a node command; returns what to print.
pub fn run(agent: &AgentArgs, cmd: &NodeCommand) -> Result<String, CliError> {
    let (client, json) = (Client::new(agent)?, agent.json);
    let (v, human): (Value, fn(&Value) -> String) = match cmd {
        NodeCommand::Status => (client.get("/status", "status")?, status),
        NodeCommand::Networks => (client.get("/network", "networks")?, networks),
        NodeCommand::Peers => (client.get("/peer", "peers")?, peers),
        NodeCommand::Join { nwid } => (
            client.post(
                &format!("/network/{nwid}"),
                &json!({}),
                &format!("join {nwid}"),
            )?,
            joined,
        ),
        NodeCommand::Leave { nwid } => {
            let v = client.delete(&format!("/network/{nwid}"), &format!("network {nwid}"))?;
            if json {
                return Ok(pretty(&v));
            }
            return Ok(format!("left {nwid}\n"));
        }
    };
    Ok(if json { pretty(&v) } else { human(&v) })
}

/// A string field, `-` when absent or empty.
fn s(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::String(_) | Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn status(v: &Value) -> String {
    let settings = &v["config"]["settings"];
    fields(&[
        ("address", s(&v["address"])),
        (
            "state",
            if v["online"] == true {
                "ONLINE".into()
            } else {
                "OFFLINE (no root answered yet)".into()
            },
        ),
        ("version", s(&v["version"])),
        (
            "planet",
            format!(
                "{} (timestamp {})",
                s(&v["planetWorldId"]),
                s(&v["planetWorldTimestamp"])
            ),
        ),
        ("listening on", list(&settings["listeningOn"], ", ")),
        ("port", s(&settings["primaryPort"])),
        ("home", s(&settings["homeDir"])),
        ("identity", s(&v["publicIdentity"])),
    ])
}

fn network_row(n: &Value) -> [String; 7] {
    [
        s(&n["nwid"]),
        s(&n["name"]),
        s(&n["status"]),
        s(&n["type"]),
        s(&n["mac"]),
        s(&n["portDeviceName"]),
        list(&n["assignedAddresses"], ","),
    ]
}

const NETWORK_HEADER: [&str; 7] = [
    "NWID",
    "NAME",
    "STATUS",
    "TYPE",
    "MAC",
    "DEVICE",
    "ADDRESSES",
];

fn networks(v: &Value) -> String {
    let rows: Vec<_> = v
        .as_array()
        .map(|a| a.iter().map(network_row).collect())
        .unwrap_or_default();
    if rows.is_empty() {
        return "no networks joined\n".into();
    }
    table(NETWORK_HEADER, &rows)
}

fn joined(n: &Value) -> String {
    format!(
        "joined {}\n{}",
        s(&n["nwid"]),
        table(NETWORK_HEADER, &[network_row(n)])
    )
}

/// `-1` and `-1.-1.-1` are the API's "not known yet".
fn known(v: &Value) -> String {
    match v {
        Value::Number(n) if n.as_i64() == Some(-1) => "-".into(),
        Value::String(x) if x == "-1.-1.-1" => "-".into(),
        _ => s(v),
    }
}

fn peers(v: &Value) -> String {
    let rows: Vec<[String; 5]> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let paths: Vec<String> = p["paths"]
                        .as_array()
                        .map(|ps| ps.iter().map(|x| s(&x["address"])).collect())
                        .unwrap_or_default();
                    let latency = match known(&p["latency"]) {
                        l if l == "-" => l,
                        l => format!("{l} ms"),
                    };
                    [
                        s(&p["address"]),
                        s(&p["role"]),
                        latency,
                        known(&p["version"]),
                        if paths.is_empty() {
                            "- (relayed)".into()
                        } else {
                            paths.join(",")
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        return "no peers\n".into();
    }
    table(["ADDRESS", "ROLE", "LATENCY", "VERSION", "PATHS"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_show_unknowns_as_dashes() {
        let v = json!([
            {"address": "0123456789", "role": "PLANET", "latency": 3, "version": "1.14.1",
             "paths": [{"address": "127.0.0.1/9993"}]},
            {"address": "abcdef0123", "role": "LEAF", "latency": -1, "version": "-1.-1.-1",
             "paths": []}
        ]);
        let t = peers(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[1],
            "0123456789  PLANET  3 ms     1.14.1   127.0.0.1/9993"
        );
        assert_eq!(
            lines[2],
            "abcdef0123  LEAF    -        -        - (relayed)"
        );
    }

    #[test]
    fn no_networks_says_so() {
        assert_eq!(networks(&json!([])), "no networks joined\n");
    }
}
