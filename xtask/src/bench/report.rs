//! The figures of one bench run, their targets, and how they are printed and written as JSON.

use std::collections::BTreeMap;

use flatwire_tests::planet::Tcp;
use serde_json::{Value, json};

use super::measure::{Counters, Rtt};
use super::pods::{Batch, PodFigures};
use super::spread::{RunCpu, Spread};
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
    /// Its data-plane threads alone, seconds per GB.
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
    /// Round trips between two threads that sleep in between ([`super::measure::wakeup_echo`]),
    /// both on one CPU and on two: two wake-ups each. A flatwire round trip adds three
    /// (both agents on the way out, the sender's agent on the way back).
    pub wakeup_echo: [Option<Rtt>; 2],
    /// Pod pairs on one and on two data-plane threads; `Err` says why it is missing.
    pub spread: Result<Spread, String>,
    /// Pod start/stop through the CNI plugin on host `b`; `Err` says why it is missing.
    pub pods: Result<PodFigures, String>,
    /// Only the pods were measured (`--only-pods`): the link targets are left out.
    pub only_pods: bool,
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
            wakeup_echo: [None; 2],
            spread: Err("not measured".into()),
            pods: Err("not measured".into()),
            only_pods: false,
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

    /// The pod figures when the run had the 100 pods per batch the targets are set for.
    fn pods100(&self) -> Option<&PodFigures> {
        self.pods.as_ref().ok().filter(|p| p.pods == 100)
    }

    /// The run against its targets.
    pub fn outcomes(&self) -> Vec<Outcome> {
        let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let pods = [
            Outcome::new(
                "ADD to IP ready p99, 100 sequential pods",
                self.pods100().map(|p| p.sequential.add.p99_ms),
                "ms",
                "< 100",
                |v| v < 100.0,
            ),
            Outcome::new(
                "ADD to IP ready p99, 100 concurrent pods",
                self.pods100().map(|p| p.concurrent.add.p99_ms),
                "ms",
                "< 500",
                |v| v < 500.0,
            ),
            Outcome::new(
                "agent memory per attached pod",
                self.pods100().map(|p| p.per_pod() as f64 / 1024.0),
                "KiB",
                "< 256",
                |v| v < 256.0,
            ),
            Outcome::new(
                "agent RSS with 100 attached pods",
                self.pods100().map(|p| p.rss_sequential as f64 / MIB),
                "MiB",
                "< 40",
                |v| v < 40.0,
            ),
        ];
        if self.only_pods {
            return pods.to_vec();
        }
        let mut links = vec![
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
        ];
        links.extend(pods);
        links
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
        let echo = |cpus: usize| {
            self.wakeup_echo[cpus - 1]
                .map_or("-".into(), |r| format!("{:.0} / {:.0}", r.p50_us, r.p99_us))
        };
        row(
            &mut t,
            "wake-up echo RTT p50 / p99, us, 1 / 2 CPUs",
            ["".into(), echo(1), echo(2)],
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
                format!("{:.2} (dp threads {:.2})", c.process, c.dataplane)
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
        let spread = self.spread.as_ref().ok();
        row(
            &mut t,
            "4 streams, 1 pod pair (1 dp thread), Gbit/s",
            ["".into(), "".into(), f2(spread.map(|s| s.one_pair.gbps))],
        );
        row(
            &mut t,
            "2+2 streams, 2 pod pairs (2 dp threads), Gbit/s",
            ["".into(), "".into(), f2(spread.map(|s| s.two_pairs.gbps))],
        );
        row(
            &mut t,
            "2 pod pairs vs 1",
            [
                "".into(),
                "".into(),
                vs(
                    spread.map(|s| s.two_pairs.gbps),
                    spread.map(|s| s.one_pair.gbps),
                ),
            ],
        );
        t
    }

    /// The pods table: one row per measure, a column per batch.
    pub fn pods_table(&self) -> Table {
        let mut t = Table::new(&["pods via flatwire-cni", "sequential", "concurrent"]);
        let p = match &self.pods {
            Ok(p) => p,
            Err(why) => {
                t.row(&["missing", why, why]);
                return t;
            }
        };
        let row = |t: &mut Table, name: &str, f: &dyn Fn(&Batch) -> String| {
            t.row(&[name, &f(&p.sequential), &f(&p.concurrent)]);
        };
        let lat = |l: super::pods::Latency| {
            let ms = super::pods::ms;
            format!("{} / {} / {}", ms(l.p50_ms), ms(l.p99_ms), ms(l.max_ms))
        };
        row(&mut t, "pods", &|_| p.pods.to_string());
        row(&mut t, "machine load average at start", &|b| {
            b.load.map_or("-".into(), |l| format!("{l:.1}"))
        });
        row(&mut t, "identity pool before -> after", &|b| {
            format!(
                "{} -> {} (depth {})",
                b.pool_before, b.pool_after, p.pool_target
            )
        });
        row(&mut t, "ADD to IP ready p50 / p99 / max, ms", &|b| {
            lat(b.add)
        });
        row(&mut t, "agent Attach (its log) p50 / p99 / max, ms", &|b| {
            b.agent_attach.map_or("-".into(), lat)
        });
        row(&mut t, "ADD wall time of the batch, s", &|b| {
            format!("{:.2}", b.add_wall_s)
        });
        row(&mut t, "DEL to interface gone p50 / p99 / max, ms", &|b| {
            lat(b.del)
        });
        row(&mut t, "failed ADD / DEL", &|b| {
            format!("{} / {}", b.failures.add, b.failures.del)
        });
        let mib = |b: u64| format!("{:.1}", b as f64 / MIB);
        t.row(&[
            "agent RSS idle -> batch attached, MiB",
            &format!("{} -> {}", mib(p.rss_idle), mib(p.rss_sequential)),
            &format!("{} -> {} (both)", mib(p.rss_sequential), mib(p.rss_all)),
        ]);
        t.row(&[
            "agent memory per attached pod, KiB",
            &format!("{:.0} (both batches)", p.per_pod() as f64 / 1024.0),
            "",
        ]);
        t.row(&["agent RSS after every DEL, MiB", &mib(p.rss_after_del), ""]);
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
        let rtt = |r: Option<Rtt>| {
            r.map_or(Value::Null, |r| {
                json!({
                    "p50_us": r.p50_us, "p99_us": r.p99_us,
                    "replies": r.samples, "sent": r.sent,
                })
            })
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
                        "rtt": rtt(l.rtt),
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
            "wakeup_echo_rtt": {
                "one_cpu": rtt(self.wakeup_echo[0]),
                "two_cpus": rtt(self.wakeup_echo[1]),
            },
            "agent": {
                "sender_cpu": cpu(self.sender_cpu),
                "receiver_cpu": cpu(self.receiver_cpu),
                "rss_one_member_bytes": self.rss_one.iter()
                    .map(|(n, b)| (n.clone(), json!(b)))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "dataplane_threads": self.spread.as_ref().map_or(Value::Null, |s| {
                let threads = |c: &[(String, f64)]| {
                    c.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>()
                };
                let cpu = |c: &RunCpu| {
                    json!({"sender_s": threads(&c.sender), "receiver_s": threads(&c.receiver)})
                };
                json!({
                    "threads": s.threads,
                    "one_pair_4_streams": tcp(Some(s.one_pair)),
                    "two_pairs_2_streams_each": tcp(Some(s.two_pairs)),
                    "ratio": s.two_pairs.gbps / s.one_pair.gbps,
                    "cpu_one_pair": cpu(&s.cpu[0]),
                    "cpu_two_pairs": cpu(&s.cpu[1]),
                })
            }),
            "dataplane_threads_missing": self.spread.as_ref().err(),
            "pods": self.pods.as_ref().map_or(Value::Null, PodFigures::to_json),
            "pods_missing": self.pods.as_ref().err(),
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
            pods: Err("Attach is not implemented".into()),
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
        assert!(
            o[3..].iter().all(|o| o.met.is_none()),
            "pod figures are missing, not invented"
        );
        let targets = f.targets_table().render();
        assert!(targets.contains("MISSED"), "{targets}");
        assert!(targets.contains("NOT MEASURED"), "{targets}");
        let figures = f.figures_table().render();
        assert!(figures.contains("+60 / +120"), "{figures}");
        assert!(figures.contains("0.10x"), "{figures}");
        assert!(f.to_json()["wakeup_echo_rtt"]["one_cpu"].is_null());
        f.wakeup_echo = [rtt(45.0), rtt(130.0)];
        let figures = f.figures_table().render();
        assert!(figures.contains("45 / 90"), "{figures}");
        assert!(figures.contains("130 / 260"), "{figures}");
        let j = f.to_json();
        assert_eq!(j["wakeup_echo_rtt"]["one_cpu"]["p50_us"], 45.0);
        assert_eq!(j["wakeup_echo_rtt"]["two_cpus"]["p99_us"], 260.0);
        assert_eq!(j["links"]["flatwire"]["added_rtt_us"]["p50"], 60.0);
        assert_eq!(j["targets"][0]["result"], "MISSED");
        assert!(j["pods"].is_null());
        assert_eq!(j["pods_missing"], "Attach is not implemented");
        assert!(
            f.pods_table()
                .render()
                .contains("Attach is not implemented")
        );
        f.pods = Ok(PodFigures::example(100, 75.0, 900.0));
        let o = f.outcomes();
        assert_eq!(o[3].value, Some(75.0));
        assert_eq!(o[3].met, Some(true));
        assert_eq!(o[4].met, Some(false), "900 ms is over 500 ms");
        assert_eq!(
            o[5].value,
            Some(((20 << 20) / 200) as f64 / 1024.0),
            "20 MiB over 200 pods"
        );
        assert_eq!(o[5].met, Some(true));
        assert_eq!(o[6].value, Some(20.0));
        let pods = f.pods_table().render();
        assert!(pods.contains("128 -> 28"), "{pods}");
        assert_eq!(f.to_json()["pods"]["per_pod_bytes"], (20 << 20) / 200);
        f.only_pods = true;
        assert_eq!(f.outcomes().len(), 4, "only the pod targets");
        f.pods = Ok(PodFigures::example(10, 75.0, 900.0));
        assert!(
            f.outcomes().iter().all(|o| o.met.is_none()),
            "targets are set for 100 pods"
        );
    }
}
