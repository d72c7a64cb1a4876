//! The figures of one bench run, their targets, and how they are printed and written as JSON.

use std::collections::BTreeMap;

use flatwire_tests::planet::Tcp;
use serde_json::{Value, json};

use super::measure::{Counters, Rtt};
use super::members::MemberRss;
use crate::table::Table;

/// The three ways the two hosts are connected.
pub const LINKS: [&str; 3] = ["underlay", "vxlan", "flatwire"];
/// Index of the flatwire link in [`LINKS`].
pub const FLATWIRE: usize = 2;
/// Index of the underlay link in [`LINKS`].
pub const UNDERLAY: usize = 0;
/// Index of the VXLAN link in [`LINKS`].
pub const VXLAN: usize = 1;

/// What was measured over one link.
#[derive(Debug, Clone, Default)]
pub struct LinkFigures {
    /// One TCP stream.
    pub tcp1: Option<Tcp>,
    /// Four parallel TCP streams.
    pub tcp4: Option<Tcp>,
    /// Ping round trips.
    pub rtt: Option<Rtt>,
    /// The machine's 1-minute load average when this link's runs began.
    pub load: Option<f64>,
}

/// CPU an agent spent per GB moved during the flatwire TCP runs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuPerGb {
    /// Whole process, seconds per GB.
    pub process: f64,
    /// Its `flatwire-dp` thread alone, seconds per GB.
    pub dataplane: f64,
}

/// Where the flatwire runs lost packets (deltas over the runs).
#[derive(Debug, Clone, Default)]
pub struct Losses {
    /// Agent drop counters that grew, per agent (`sender`, `receiver`) and reason.
    pub agent_drops: BTreeMap<String, BTreeMap<String, u64>>,
    /// Kernel counters of the sender's namespace.
    pub sender: Counters,
    /// Kernel counters of the receiver's namespace.
    pub receiver: Counters,
}

/// Everything one run found.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Per link, in [`LINKS`] order.
    pub links: [LinkFigures; 3],
    /// The flatwire network's MTU (the TAP's), for the record.
    pub flatwire_mtu: Option<u32>,
    /// Sender agent CPU per GB (single-stream and 4-stream runs together).
    pub sender_cpu: Option<CpuPerGb>,
    /// Receiver agent CPU per GB.
    pub receiver_cpu: Option<CpuPerGb>,
    /// Loss counters of the flatwire runs.
    pub losses: Option<Losses>,
    /// RSS of each host agent with its one member (its host), bytes.
    pub rss_one: Vec<(String, u64)>,
    /// RSS of agent `b` with attached members; `Err` says why it is missing.
    pub rss_members: Result<MemberRss, String>,
    /// What could not be measured, and why.
    pub failures: Vec<String>,
}

impl Default for Figures {
    fn default() -> Self {
        Self {
            links: Default::default(),
            flatwire_mtu: None,
            sender_cpu: None,
            receiver_cpu: None,
            losses: None,
            rss_one: Vec::new(),
            rss_members: Err("not measured".into()),
            failures: Vec::new(),
        }
    }
}

/// One target and how the run did against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What is compared.
    pub name: &'static str,
    /// The measured value (None: not measured).
    pub value: Option<f64>,
    /// Unit of the value.
    pub unit: &'static str,
    /// The target as text.
    pub want: &'static str,
    /// Whether the value meets the target.
    pub met: Option<bool>,
}

impl Outcome {
    fn new(
        name: &'static str,
        value: Option<f64>,
        unit: &'static str,
        want: &'static str,
        ok: impl Fn(f64) -> bool,
    ) -> Self {
        Self {
            name,
            value,
            unit,
            want,
            met: value.map(ok),
        }
    }

    fn result(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "NOT MEASURED",
        }
    }
}

/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

impl Figures {
    fn tcp1(&self, link: usize) -> Option<f64> {
        self.links[link].tcp1.map(|t| t.gbps)
    }

    fn tcp4(&self, link: usize) -> Option<f64> {
        self.links[link].tcp4.map(|t| t.gbps)
    }

    /// Added RTT of `link` over the underlay (p50, p99), microseconds.
    fn added_rtt(&self, link: usize) -> Option<(f64, f64)> {
        let (a, u) = (self.links[link].rtt?, self.links[UNDERLAY].rtt?);
        Some((a.p50_us - u.p50_us, a.p99_us - u.p99_us))
    }

    /// The run against its targets.
    pub fn outcomes(&self) -> Vec<Outcome> {
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        vec![
            Outcome::new(
                "flatwire single stream / VXLAN single stream",
                ratio(self.tcp1(FLATWIRE), self.tcp1(VXLAN)),
                "x",
                ">= 0.15",
                |v| v >= 0.15,
            ),
            Outcome::new(
                "flatwire 4 streams / flatwire single stream",
                ratio(self.tcp4(FLATWIRE), self.tcp1(FLATWIRE)),
                "x",
                ">= 1.2",
                |v| v >= 1.2,
            ),
            Outcome::new(
                "flatwire added RTT p50 (vs underlay)",
                self.added_rtt(FLATWIRE).map(|r| r.0),
                "us",
                "< 120",
                |v| v < 120.0,
            ),
            Outcome::new(
                "agent RSS with 100 attached members",
                self.rss_members
                    .as_ref()
                    .ok()
                    .filter(|m| m.members == 100)
                    .map(|m| m.all as f64 / MIB),
                "MiB",
                "< 40",
                |v| v < 40.0,
            ),
        ]
    }

    /// The figures table: one row per measure, a column per link.
    pub fn figures_table(&self) -> Table {
        let mut t = Table::new(&["measure", LINKS[0], LINKS[1], LINKS[2]]);
        let f2 = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let f0 = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        let row = |t: &mut Table, name: &str, cells: [String; 3]| {
            t.row(&[name, &cells[0], &cells[1], &cells[2]]);
        };
        let per = |f: &dyn Fn(&LinkFigures) -> String| -> [String; 3] {
            [f(&self.links[0]), f(&self.links[1]), f(&self.links[2])]
        };
        row(
            &mut t,
            "TCP 1 stream, Gbit/s",
            per(&|l| f2(l.tcp1.map(|x| x.gbps))),
        );
        row(
            &mut t,
            "TCP 4 streams, Gbit/s",
            per(&|l| f2(l.tcp4.map(|x| x.gbps))),
        );
        row(
            &mut t,
            "retransmits (1 / 4 streams)",
            per(&|l| {
                let r = |x: Option<Tcp>| x.map_or("-".into(), |x| x.retransmits.to_string());
                format!("{} / {}", r(l.tcp1), r(l.tcp4))
            }),
        );
        row(&mut t, "RTT p50, us", per(&|l| f0(l.rtt.map(|r| r.p50_us))));
        row(&mut t, "RTT p99, us", per(&|l| f0(l.rtt.map(|r| r.p99_us))));
        row(
            &mut t,
            "ping replies",
            per(&|l| {
                l.rtt
                    .map_or("-".into(), |r| format!("{}/{}", r.samples, r.sent))
            }),
        );
        row(
            &mut t,
            "machine load average at start",
            per(&|l| f2(l.load)),
        );
        let added = |link: usize| {
            self.added_rtt(link)
                .map_or("-".into(), |(a, b)| format!("+{a:.0} / +{b:.0}"))
        };
        row(
            &mut t,
            "added RTT p50 / p99, us",
            ["".into(), added(VXLAN), added(FLATWIRE)],
        );
        let vs = |a: Option<f64>, b: Option<f64>| {
            a.zip(b)
                .map_or("-".into(), |(a, b)| format!("{:.2}x", a / b))
        };
        row(
            &mut t,
            "1 stream vs underlay",
            [
                "1.00x".into(),
                vs(self.tcp1(VXLAN), self.tcp1(UNDERLAY)),
                vs(self.tcp1(FLATWIRE), self.tcp1(UNDERLAY)),
            ],
        );
        row(
            &mut t,
            "1 stream vs VXLAN",
            [
                "".into(),
                "1.00x".into(),
                vs(self.tcp1(FLATWIRE), self.tcp1(VXLAN)),
            ],
        );
        row(
            &mut t,
            "4 streams vs 1 stream",
            [
                vs(self.tcp4(UNDERLAY), self.tcp1(UNDERLAY)),
                vs(self.tcp4(VXLAN), self.tcp1(VXLAN)),
                vs(self.tcp4(FLATWIRE), self.tcp1(FLATWIRE)),
            ],
        );
        let cpu = |c: Option<CpuPerGb>| {
            c.map_or("-".into(), |c| {
                format!("{:.2} (dp thread {:.2})", c.process, c.dataplane)
            })
        };
        row(
            &mut t,
            "sender agent CPU s/GB",
            ["".into(), "".into(), cpu(self.sender_cpu)],
        );
        row(
            &mut t,
            "receiver agent CPU s/GB",
            ["".into(), "".into(), cpu(self.receiver_cpu)],
        );
        let udp_loss = self.losses.as_ref().map_or("-".into(), |l| {
            let c = &l.receiver;
            format!(
                "{} of {} ({})",
                c.udp_rcvbuf_errors,
                c.udp_in_datagrams + c.udp_rcvbuf_errors,
                c.udp_loss_percent()
                    .map_or("-".into(), |p| format!("{p:.1}%"))
            )
        });
        row(
            &mut t,
            "receiver UDP rcvbuf drops",
            ["".into(), "".into(), udp_loss],
        );
        let rss_one = self
            .rss_one
            .iter()
            .map(|(n, b)| format!("{n} {:.1}", *b as f64 / MIB))
            .collect::<Vec<_>>()
            .join(", ");
        row(
            &mut t,
            "agent RSS, host member only, MiB",
            ["".into(), "".into(), rss_one],
        );
        let (one, all) = match &self.rss_members {
            Ok(m) => (
                format!("b {:.1}", m.one as f64 / MIB),
                format!("b {:.1} ({} members)", m.all as f64 / MIB, m.members),
            ),
            Err(why) => (format!("missing: {why}"), format!("missing: {why}")),
        };
        row(
            &mut t,
            "agent RSS, +1 attached member, MiB",
            ["".into(), "".into(), one],
        );
        row(
            &mut t,
            "agent RSS, all attached, MiB",
            ["".into(), "".into(), all],
        );
        let (per, attach) = match &self.rss_members {
            Ok(m) => (
                format!("{:.0}", m.per_member() as f64 / 1024.0),
                format!("{:.0} / {:.0}", m.attach_p50_ms, m.attach_p99_ms),
            ),
            Err(why) => (format!("missing: {why}"), format!("missing: {why}")),
        };
        row(
            &mut t,
            "agent memory per attached member, KiB",
            ["".into(), "".into(), per],
        );
        row(
            &mut t,
            "gRPC Attach p50 / p99, ms (sequential)",
            ["".into(), "".into(), attach],
        );
        t
    }

    /// The targets table.
    pub fn targets_table(&self) -> Table {
        let mut t = Table::new(&["target", "value", "want", "result"]);
        for o in self.outcomes() {
            let v = o.value.map_or("-".into(), |v| format!("{v:.2} {}", o.unit));
            let want = format!("{} {}", o.want, o.unit);
            t.row(&[o.name, &v, &want, o.result()]);
        }
        t
    }

    /// The same figures as JSON.
    pub fn to_json(&self) -> Value {
        let tcp = |t: Option<Tcp>| {
            t.map_or(
                Value::Null,
                |t| json!({"gbps": t.gbps, "bytes": t.bytes, "retransmits": t.retransmits}),
            )
        };
        let links: serde_json::Map<String, Value> = LINKS
            .iter()
            .zip(&self.links)
            .enumerate()
            .map(|(i, (name, l))| {
                let added = self.added_rtt(i).filter(|_| i != UNDERLAY);
                (
                    (*name).to_owned(),
                    json!({
                        "tcp_1_stream": tcp(l.tcp1),
                        "tcp_4_streams": tcp(l.tcp4),
                        "rtt": l.rtt.map_or(Value::Null, |r| json!({
                            "p50_us": r.p50_us, "p99_us": r.p99_us,
                            "replies": r.samples, "sent": r.sent,
                        })),
                        "added_rtt_us": added.map_or(Value::Null, |(a, b)| json!({
                            "p50": a, "p99": b
                        })),
                        "load_average": l.load,
                    }),
                )
            })
            .collect();
        let cpu = |c: Option<CpuPerGb>| {
            c.map_or(Value::Null, |c| {
                json!({"process_s_per_gb": c.process, "dataplane_thread_s_per_gb": c.dataplane})
            })
        };
        let counters = |c: &Counters| {
            json!({
                "udp_in_datagrams": c.udp_in_datagrams,
                "udp_rcvbuf_loss_percent": c.udp_loss_percent(),
                "udp_rcvbuf_errors": c.udp_rcvbuf_errors,
                "udp_sndbuf_errors": c.udp_sndbuf_errors,
                "tap_tx_dropped": c.tap_tx_dropped,
                "tap_rx_dropped": c.tap_rx_dropped,
            })
        };
        json!({
            "links": links,
            "flatwire_mtu": self.flatwire_mtu,
            "agent": {
                "sender_cpu": cpu(self.sender_cpu),
                "receiver_cpu": cpu(self.receiver_cpu),
                "rss_one_member_bytes": self.rss_one.iter()
                    .map(|(n, b)| (n.clone(), json!(b)))
                    .collect::<serde_json::Map<_, _>>(),
                "rss_attached": self.rss_members.as_ref().map_or(Value::Null, |m| json!({
                    "members": m.members, "one_bytes": m.one, "all_bytes": m.all,
                    "per_member_bytes": m.per_member(),
                    "attach_ms": {"p50": m.attach_p50_ms, "p99": m.attach_p99_ms},
                })),
                "rss_attached_missing": self.rss_members.as_ref().err(),
            },
            "flatwire_losses": self.losses.as_ref().map_or(Value::Null, |l| json!({
                "agent_drops": l.agent_drops,
                "sender": counters(&l.sender),
                "receiver": counters(&l.receiver),
            })),
            "targets": self.outcomes().iter().map(|o| json!({
                "name": o.name, "value": o.value, "unit": o.unit, "want": o.want,
                "result": o.result(),
            })).collect::<Vec<_>>(),
            "failures": self.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(gbps: f64) -> Option<Tcp> {
        Some(Tcp {
            gbps,
            bytes: 1,
            retransmits: 0,
        })
    }

    fn rtt(p50_us: f64) -> Option<Rtt> {
        Some(Rtt {
            samples: 200,
            sent: 200,
            p50_us,
            p99_us: p50_us * 2.0,
        })
    }

    #[test]
    fn targets_are_judged_from_ratios() {
        let mut f = Figures {
            rss_members: Err("Attach is not implemented".into()),
            ..Figures::default()
        };
        f.links[UNDERLAY] = LinkFigures {
            tcp1: tcp(20.0),
            tcp4: tcp(30.0),
            rtt: rtt(40.0),
            load: None,
        };
        f.links[VXLAN] = LinkFigures {
            tcp1: tcp(10.0),
            tcp4: tcp(15.0),
            rtt: rtt(50.0),
            load: None,
        };
        f.links[FLATWIRE] = LinkFigures {
            tcp1: tcp(1.0),
            tcp4: tcp(1.5),
            rtt: rtt(100.0),
            load: Some(1.5),
        };
        let o = f.outcomes();
        assert_eq!(o[0].met, Some(false), "1.0 / 10.0 is below 15%");
        assert!((o[0].value.unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(o[1].met, Some(true), "1.5x");
        assert_eq!(o[2].value, Some(60.0));
        assert_eq!(o[2].met, Some(true));
        assert_eq!(
            o[3].met, None,
            "RSS at 100 members is missing, not invented"
        );
        let targets = f.targets_table().render();
        assert!(targets.contains("MISSED"), "{targets}");
        assert!(targets.contains("NOT MEASURED"), "{targets}");
        let figures = f.figures_table().render();
        assert!(figures.contains("+60 / +120"), "{figures}");
        assert!(figures.contains("0.10x"), "{figures}");
        let j = f.to_json();
        assert_eq!(j["links"]["flatwire"]["added_rtt_us"]["p50"], 60.0);
        assert_eq!(j["targets"][0]["result"], "MISSED");
        assert!(j["agent"]["rss_attached"].is_null());
        assert_eq!(
            j["agent"]["rss_attached_missing"],
            "Attach is not implemented"
        );
        f.rss_members = Ok(MemberRss {
            one: 20 * 1024 * 1024,
            all: 50 * 1024 * 1024,
            members: 100,
            attach_p50_ms: 120.0,
            attach_p99_ms: 900.0,
        });
        assert_eq!(
            f.to_json()["agent"]["rss_attached"]["attach_ms"]["p99"],
            900.0
        );
        assert_eq!(
            f.to_json()["agent"]["rss_attached"]["per_member_bytes"],
            30 * 1024 * 1024 / 99
        );
        let o = f.outcomes();
        assert_eq!(o[3].value, Some(50.0));
        assert_eq!(o[3].met, Some(false));
    }
}
