//! Scrapes the metrics endpoint over 127.0.0.1 and parses values out of the text.

use std::net::Ipv4Addr;
use std::sync::Arc;

use flatwire_agent::metrics::{
    self, ControllerLabels, Direction, DropLabels, Metrics, PathKind, PathLabels, RuleLabels,
    TrafficLabels,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the sample line that starts with `series` (name plus labels).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn scrape_over_loopback() {
    let m = Arc::new(Metrics::new());
    m.peers.set(3);
    m.paths
        .get_or_create(&PathLabels {
            kind: PathKind::Direct,
        })
        .set(2);
    m.paths
        .get_or_create(&PathLabels {
            kind: PathKind::Relayed,
        })
        .set(1);
    let rx = TrafficLabels {
        network: "8056c2e21c000001".into(),
        direction: Direction::Rx,
    };
    m.bytes.get_or_create(&rx).inc_by(1500);
    m.bytes.get_or_create(&rx).inc_by(42);
    m.packets.get_or_create(&rx).inc_by(2);
    m.drops
        .get_or_create(&DropLabels { reason: "bad_mac" })
        .inc();
    m.identity_pool_depth.set(16);
    m.rule_hits
        .get_or_create(&RuleLabels {
            network: "8056c2e21c000001".into(),
            action: "drop",
            direction: Direction::Rx,
        })
        .inc_by(5);
    m.controller_requests
        .get_or_create(&ControllerLabels {
            kind: "network_config",
            result: "ok",
        })
        .inc();

    let listener = metrics::bind((Ipv4Addr::LOCALHOST, 0).into())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(metrics::serve(listener, m.clone()));

    let resp = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains(metrics::CONTENT_TYPE), "{head}");
    assert_eq!(value(body, "flatwire_peers"), Some(3.0), "{body}");
    assert_eq!(value(body, r#"flatwire_paths{kind="direct"}"#), Some(2.0));
    assert_eq!(value(body, r#"flatwire_paths{kind="relayed"}"#), Some(1.0));
    assert_eq!(
        value(
            body,
            r#"flatwire_bytes_total{network="8056c2e21c000001",direction="rx"}"#
        ),
        Some(1542.0),
        "{body}"
    );
    assert_eq!(
        value(
            body,
            r#"flatwire_packets_total{network="8056c2e21c000001",direction="rx"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        value(body, r#"flatwire_drops_total{reason="bad_mac"}"#),
        Some(1.0)
    );
    assert_eq!(value(body, "flatwire_identity_pool_depth"), Some(16.0));
    assert_eq!(
        value(
            body,
            r#"flatwire_rule_hits_total{network="8056c2e21c000001",action="drop",direction="rx"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        value(
            body,
            r#"flatwire_controller_requests_total{kind="network_config",result="ok"}"#
        ),
        Some(1.0)
    );
    assert!(body.ends_with("# EOF\n"));

    // A value changes between scrapes.
    m.peers.set(4);
    let resp = get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(
        value(resp.split_once("\r\n\r\n").unwrap().1, "flatwire_peers"),
        Some(4.0)
    );

    // Other paths and methods.
    assert!(
        get(addr, "GET / HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404")
    );
    assert!(
        get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405")
    );
    assert!(
        get(addr, "garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405")
    );
    server.abort();
}
