//! The local HTTP API, shaped like ZeroTier One's service API (`OneService.cpp`): JSON over
//! loopback TCP on the UDP port's number (`--api-listen` to change), every request
//! authenticated with the token in `HOME/authtoken.secret` (header `X-ZT1-Auth`, or
//! `Authorization: Bearer`, or query `?auth=`).
//!
//! Endpoints: `GET /status`, `GET /peer`, `GET /peer/{address}`, `GET /network`,
//! `GET|POST|DELETE /network/{nwid}` (POST joins and DELETE leaves at runtime, remembered in
//! `HOME/networks.d`), and with the controller role `GET /controller` and
//! `GET|POST|DELETE /controller/network[/{nwid}[/member[/{address}]]]` (ZeroTier's controller
//! JSON; the store's own checks decide 400s; a member POST may pin `identity`, a different
//! one than the pinned identity gets 409), plus flatwire's pod bindings
//! `GET /controller/network/{nwid}/pod` and `GET|POST|DELETE /controller/network/{nwid}/pod/{uid}`
//! (see `networks::pod_api`). Errors are JSON
//! `{"error": ".."}`: 401 without the token, 404 for unknown paths and objects, 405 for a
//! method a path does not take, 400 for bad JSON bodies or IDs, 503 without a running node.
//!
//! Field names and types are those of ZeroTier One 1.14.1's answers (recorded in
//! `spec/vectors/zt-one/api-json`). What flatwire does not track yet gets ZeroTier's value for
//! "none": path `lastSend`/`lastReceive`/`localSocket`/`localPort` are 0, `latency` and the
//! peer `version*` fields are -1 (`"-1.-1.-1"`) until measured or announced, `linkQuality`
//! is absent (1.14 omits it too), status `config.settings.surfaceAddresses` is empty and
//! `tcpFallbackRelay` is `""` (no TCP relay), `allowManaged` is true and `allowGlobal`/`allowDefault`/`allowDNS` false (the fixed local
//! settings), `bridge`/`dhcp` false and `portError` 0 (-1 when the TAP failed). `version`
//! is the ZeroTier version flatwire speaks on the wire (1.14.1), not the crate version.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flatwire_vl1::Address;
use flatwire_vl2::NetworkId;
use flatwire_vl2::member::Status;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::dataplane::{NodeHandle, NodeSnapshot, PeerRole, PeerSnapshot};
use crate::metrics;
use crate::networks::NetworkSnapshot;
use crate::state::{Sensitivity, StateDir, StateError};

/// The token file in the state directory.
pub const TOKEN_FILE: &str = "authtoken.secret";
/// Length of a generated token (alphanumerics), as ZeroTier One.
pub const TOKEN_LEN: usize = 24;
/// The ZeroTier version flatwire announces (and reports in `/status`).
pub const ZT_VERSION: (u8, u8, u16) = (1, 14, 1);
/// Largest request head.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
const MAX_BODY: usize = 64 * 1024;

/// Reads the API token from `HOME/authtoken.secret`, creating it (24 random alphanumerics,
/// mode 0600) if missing. Blocking file I/O.
pub fn load_or_create_token(state: &StateDir) -> Result<String, StateError> {
    if let Some(b) = state.read(TOKEN_FILE)? {
        let t = String::from_utf8_lossy(&b).trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let token = random_token().map_err(|e| StateError::Io {
        path: state.root().join(TOKEN_FILE),
        source: std::io::Error::other(e.to_string()),
    })?;
    state.write(TOKEN_FILE, token.as_bytes(), Sensitivity::Secret)?;
    Ok(token)
}

fn random_token() -> Result<String, getrandom::Error> {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(TOKEN_LEN);
    let mut buf = [0u8; 64];
    while out.len() < TOKEN_LEN {
        getrandom::fill(&mut buf)?;
        // 248 = 4 * 62: rejecting above it keeps the choice uniform.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() < TOKEN_LEN {
                out.push(char::from(ALNUM[usize::from(*b % 62)]));
            }
        }
    }
    Ok(out)
}

/// What the API serves from.
#[derive(Debug)]
pub struct ApiContext {
    /// The auth token.
    pub token: String,
    /// The data plane (`None` when the node is not running, e.g. without a planet).
    pub node: Option<Arc<NodeHandle>>,
    /// Our address.
    pub address: Address,
    /// Our public identity (`address:0:public`).
    pub public_identity: String,
    /// The state directory.
    pub home: PathBuf,
    /// Where joined networks are remembered (`HOME/networks.d`).
    pub networks_dir: PathBuf,
    /// The UDP port.
    pub primary_port: u16,
    /// Whether the controller role runs.
    pub controller: bool,
}

/// A parsed request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query string (after `?`), raw.
    pub query: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// An answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

fn error(status: u16, msg: &str) -> Response {
    Response {
        status,
        body: json!({ "error": msg }),
    }
}

fn ok(body: Value) -> Response {
    Response { status: 200, body }
}

/// Binds the API listener (use a loopback address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the API on `listener` until the task is dropped; one task per connection,
/// `Connection: close`.
pub async fn serve(listener: TcpListener, ctx: Arc<ApiContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &ctx).await {
                        tracing::debug!(error = %e, "API connection");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, ctx: &ApiContext) -> std::io::Result<()> {
    let resp = match tokio::time::timeout(Duration::from_secs(5), read_request(&mut stream)).await {
        Ok(Ok(Ok(req))) => handle(ctx, &req).await,
        Ok(Ok(Err(resp))) => resp,
        Ok(Err(e)) => return Err(e),
        Err(_) => error(408, "request timeout"),
    };
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    metrics::respond(
        &mut stream,
        &format!("{} {reason}", resp.status),
        "application/json",
        &resp.body.to_string(),
    )
    .await
}

/// Reads one request (head and `Content-Length` body); an `Err` inside is the answer to a
/// malformed one.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Result<Request, Response>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Ok(Err(error(400, "request head too large")));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(error(400, "incomplete request")));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    if method.is_empty() || !target.starts_with('/') {
        return Ok(Err(error(400, "malformed request line")));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body: buf[end + 4..].to_vec(),
    };
    if req.header("transfer-encoding").is_some() {
        return Ok(Err(error(411, "chunked bodies are not supported")));
    }
    let len = match req.header("content-length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(Ok(_)) => return Ok(Err(error(413, "body too large"))),
        Some(Err(_)) => return Ok(Err(error(400, "bad Content-Length"))),
    };
    while req.body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(error(400, "incomplete body")));
        }
        req.body.extend_from_slice(&chunk[..n]);
    }
    req.body.truncate(len);
    Ok(Ok(req))
}

fn authorized(ctx: &ApiContext, req: &Request) -> bool {
    let given = req
        .header("x-zt1-auth")
        .or_else(|| req.header("authorization")?.strip_prefix("Bearer "))
        .or_else(|| req.query_param("auth"));
    given.is_some_and(|g| {
        // Compares every byte (no early exit on the first difference).
        g.len() == ctx.token.len()
            && g.bytes()
                .zip(ctx.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Answers one request.
pub async fn handle(ctx: &ApiContext, req: &Request) -> Response {
    if !authorized(ctx, req) {
        return error(401, "missing or wrong auth token (X-ZT1-Auth or ?auth=)");
    }
    let path = req.path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let m = req.method.as_str();
    let get_only = |r: Response| {
        if m == "GET" {
            r
        } else {
            error(405, "only GET")
        }
    };
    match parts.as_slice() {
        ["status"] => {
            if m != "GET" {
                return error(405, "only GET");
            }
            let snap = snapshot(ctx).await;
            ok(status_json(ctx, snap.as_ref(), now_ms()))
        }
        ["peer"] => {
            if m != "GET" {
                return error(405, "only GET");
            }
            let snap = snapshot(ctx).await;
            let peers = snap.map_or_else(Vec::new, |s| s.peers.iter().map(peer_json).collect());
            ok(Value::Array(peers))
        }
        ["peer", a] => {
            if m != "GET" {
                return error(405, "only GET");
            }
            let Ok(addr) = a.parse::<Address>() else {
                return error(404, "no such peer");
            };
            let snap = snapshot(ctx).await;
            match snap.as_ref().and_then(|s| s.peer(addr)) {
                Some(p) => ok(peer_json(p)),
                None => error(404, "no such peer"),
            }
        }
        ["network"] => get_only(match snapshot(ctx).await {
            Some(s) => ok(Value::Array(s.networks.iter().map(network_json).collect())),
            None => ok(json!([])),
        }),
        ["network", id] => network(ctx, req, id).await,
        ["controller"] if ctx.controller => get_only(ok(json!({
            "controller": true, "apiVersion": 4, "clock": now_ms(), "databaseReady": true
        }))),
        ["controller", rest @ ..] if ctx.controller => controller(ctx, req, rest).await,
        _ => error(404, "not found"),
    }
}

async fn controller(ctx: &ApiContext, req: &Request, rest: &[&str]) -> Response {
    let Some(node) = &ctx.node else {
        return error(503, "the node is not running");
    };
    let path = rest.iter().map(|s| (*s).to_string()).collect();
    match node
        .controller_api(&req.method, path, req.body.clone())
        .await
    {
        Some(Some((status, body))) => Response { status, body },
        Some(None) => error(404, "not found"),
        None => error(503, "the data plane did not answer"),
    }
}

async fn snapshot(ctx: &ApiContext) -> Option<NodeSnapshot> {
    ctx.node.as_ref()?.snapshot().await
}

async fn network(ctx: &ApiContext, req: &Request, id: &str) -> Response {
    let nwid = id.parse::<NetworkId>();
    match req.method.as_str() {
        "GET" => {
            let Ok(nwid) = nwid else {
                return error(404, "no such network");
            };
            let snap = snapshot(ctx).await;
            match snap
                .as_ref()
                .and_then(|s| s.networks.iter().find(|n| n.nwid == nwid))
            {
                Some(n) => ok(network_json(n)),
                None => error(404, "no such network"),
            }
        }
        "POST" => {
            if !req.body.iter().all(u8::is_ascii_whitespace) {
                match serde_json::from_slice::<Value>(&req.body) {
                    Ok(Value::Object(_)) => {}
                    Ok(_) => return error(400, "the body must be a JSON object"),
                    Err(e) => return error(400, &format!("bad JSON body: {e}")),
                }
            }
            let Ok(nwid) = nwid else {
                return error(400, "a network ID is 16 hex digits");
            };
            let Some(node) = &ctx.node else {
                return error(503, "the node is not running");
            };
            if node.join_network(nwid).await.is_none() {
                return error(503, "the data plane did not answer");
            }
            if let Err(e) = persist(ctx, nwid, true).await {
                tracing::error!(%nwid, error = %e, "cannot remember the joined network");
            }
            let snap = node.snapshot().await;
            match snap
                .as_ref()
                .and_then(|s| s.networks.iter().find(|n| n.nwid == nwid))
            {
                Some(n) => ok(network_json(n)),
                None => error(503, "the data plane did not answer"),
            }
        }
        "DELETE" => {
            let Ok(nwid) = nwid else {
                return error(404, "no such network");
            };
            let Some(node) = &ctx.node else {
                return error(503, "the node is not running");
            };
            match node.leave_network(nwid).await {
                None => error(503, "the data plane did not answer"),
                Some(false) => error(404, "no such network"),
                Some(true) => {
                    if let Err(e) = persist(ctx, nwid, false).await {
                        tracing::error!(%nwid, error = %e, "cannot forget the left network");
                    }
                    ok(json!({ "result": true }))
                }
            }
        }
        _ => error(405, "only GET, POST and DELETE"),
    }
}

/// Records (or forgets) a network in `HOME/networks.d`, as `--join` does.
async fn persist(ctx: &ApiContext, nwid: NetworkId, joined: bool) -> anyhow::Result<()> {
    let dir = ctx.networks_dir.clone();
    tokio::task::spawn_blocking(move || {
        let dir = StateDir::open(dir)?;
        let name = format!("{nwid}.json");
        if joined {
            dir.write_json(
                &name,
                &json!({ "id": nwid.to_string() }),
                Sensitivity::Public,
            )?;
        } else {
            dir.remove(&name)?;
        }
        Ok(())
    })
    .await?
}

fn version_fields(o: &mut BTreeMap<String, Value>, v: Option<(u8, u8, u16)>) {
    let (ma, mi, re) = v.map_or((-1, -1, -1), |(a, b, c)| {
        (i32::from(a), i32::from(b), i32::from(c))
    });
    o.insert("version".into(), json!(format!("{ma}.{mi}.{re}")));
    o.insert("versionMajor".into(), json!(ma));
    o.insert("versionMinor".into(), json!(mi));
    o.insert("versionRev".into(), json!(re));
}

/// `ip/port` as ZeroTier's `InetAddress::toString` writes it (IPv4-mapped shown as IPv4).
fn inet(a: SocketAddr) -> String {
    format!("{}/{}", a.ip().to_canonical(), a.port())
}

/// `GET /status`.
pub fn status_json(ctx: &ApiContext, snap: Option<&NodeSnapshot>, clock: u64) -> Value {
    let mut o = BTreeMap::new();
    o.insert("address".into(), json!(ctx.address.to_string()));
    o.insert("publicIdentity".into(), json!(ctx.public_identity));
    o.insert("clock".into(), json!(clock));
    o.insert("online".into(), json!(snap.is_some_and(|s| s.online)));
    o.insert(
        "planetWorldId".into(),
        json!(snap.map_or(0, |s| s.planet_id)),
    );
    o.insert(
        "planetWorldTimestamp".into(),
        json!(snap.map_or(0, |s| s.planet_timestamp)),
    );
    o.insert("tcpFallbackActive".into(), json!(false));
    version_fields(&mut o, Some(ZT_VERSION));
    o.insert("versionBuild".into(), json!(0));
    let listening: Vec<String> = snap.map_or_else(Vec::new, |s| vec![inet(s.local_addr)]);
    o.insert(
        "config".into(),
        json!({ "settings": {
            "allowManagementFrom": ["127.0.0.1/32", "::1/128"],
            "allowSecondaryPort": false,
            "allowTcpFallbackRelay": false,
            "enableWebServer": false,
            "forceTcpRelay": false,
            "homeDir": ctx.home.display().to_string(),
            "listeningOn": listening,
            "portMappingEnabled": false,
            "primaryPort": ctx.primary_port,
            "secondaryPort": 0,
            "softwareUpdate": "disable",
            "softwareUpdateChannel": "release",
            "softwareUpdateDist": false,
            "surfaceAddresses": [],
            "tcpFallbackRelay": "",
            "tertiaryPort": 0,
        }}),
    );
    Value::Object(o.into_iter().collect())
}

/// One entry of `GET /peer`.
pub fn peer_json(p: &PeerSnapshot) -> Value {
    let mut o = BTreeMap::new();
    o.insert("address".into(), json!(p.address.to_string()));
    o.insert("isBonded".into(), json!(false));
    o.insert(
        "latency".into(),
        json!(
            p.latency_ms
                .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
        ),
    );
    let paths: Vec<Value> = p
        .direct_path
        .iter()
        .map(|a| {
            json!({
                "active": true, "address": inet(*a), "expired": false, "lastReceive": 0,
                "lastSend": 0, "localPort": 0, "localSocket": 0, "preferred": true,
                "trustedPathId": 0
            })
        })
        .collect();
    o.insert("paths".into(), Value::Array(paths));
    o.insert(
        "role".into(),
        json!(match p.role {
            PeerRole::Root => "PLANET",
            PeerRole::Leaf => "LEAF",
        }),
    );
    o.insert("tunneled".into(), json!(false));
    version_fields(&mut o, p.version);
    Value::Object(o.into_iter().collect())
}

/// ZeroTier's name of a network status.
pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::RequestingConfiguration => "REQUESTING_CONFIGURATION",
        Status::Ok => "OK",
        Status::AccessDenied => "ACCESS_DENIED",
        Status::NotFound => "NOT_FOUND",
        Status::PortError => "PORT_ERROR",
        Status::ClientTooOld => "CLIENT_TOO_OLD",
        Status::AuthenticationRequired => "AUTHENTICATION_REQUIRED",
    }
}

/// One entry of `GET /network`.
pub fn network_json(n: &NetworkSnapshot) -> Value {
    let routes: Vec<Value> = n
        .routes
        .iter()
        .map(|r| {
            json!({
                "flags": r.flags, "metric": r.metric, "target": r.target.to_string(),
                "via": r.via.as_ref().map(|v| v.ip.to_string()),
            })
        })
        .collect();
    json!({
        "allowDNS": false,
        "allowDefault": false,
        "allowGlobal": false,
        "allowManaged": true,
        "assignedAddresses": n.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "bridge": false,
        "broadcastEnabled": n.broadcast,
        "dhcp": false,
        "dns": {
            "domain": n.dns.domain,
            "servers": n.dns.servers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        },
        "id": n.nwid.to_string(),
        "mac": n.mac.to_string(),
        "mtu": n.mtu,
        "multicastSubscriptions": n
            .multicast
            .iter()
            .map(|g| json!({"adi": g.adi, "mac": g.mac.to_string()}))
            .collect::<Vec<_>>(),
        "name": n.name,
        "netconfRevision": n.revision,
        "nwid": n.nwid.to_string(),
        "portDeviceName": n.tap,
        "portError": if n.status == Status::PortError { -1 } else { 0 },
        "routes": routes,
        "status": status_name(n.status),
        "type": if n.private { "PRIVATE" } else { "PUBLIC" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(token: &str) -> ApiContext {
        ApiContext {
            token: token.into(),
            node: None,
            address: "e6acfe87fc".parse().unwrap(),
            public_identity: "e6acfe87fc:0:00".into(),
            home: "/tmp/x".into(),
            networks_dir: "/tmp/x/networks.d".into(),
            primary_port: 9993,
            controller: false,
        }
    }

    fn req(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), (*v).into()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn tokens_are_24_alphanumerics() {
        let a = random_token().unwrap();
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, random_token().unwrap());
    }

    #[tokio::test]
    async fn auth_and_errors_without_a_node() {
        let c = ctx("secret");
        let auth = [("X-ZT1-Auth", "secret")];
        assert_eq!(
            handle(&c, &req("GET", "/status", &[], "")).await.status,
            401
        );
        let wrong = [("X-ZT1-Auth", "secreT")];
        assert_eq!(
            handle(&c, &req("GET", "/status", &wrong, "")).await.status,
            401
        );
        assert_eq!(
            handle(&c, &req("GET", "/status", &auth, "")).await.status,
            200
        );
        let q = req("GET", "/status?auth=secret", &[], "");
        assert_eq!(handle(&c, &q).await.status, 200);
        let bearer = [("Authorization", "Bearer secret")];
        assert_eq!(
            handle(&c, &req("GET", "/peer", &bearer, "")).await.status,
            200
        );
        let r = |m: &str, p: &str, b: &str| req(m, p, &auth, b);
        assert_eq!(handle(&c, &r("GET", "/nope", "")).await.status, 404);
        assert_eq!(handle(&c, &r("GET", "/controller", "")).await.status, 404);
        assert_eq!(handle(&c, &r("POST", "/status", "")).await.status, 405);
        assert_eq!(
            handle(&c, &r("PUT", "/network/8056c2e21c000001", ""))
                .await
                .status,
            405
        );
        let bad = handle(&c, &r("POST", "/network/8056c2e21c000001", "{nope")).await;
        assert_eq!(bad.status, 400);
        assert!(bad.body["error"].as_str().unwrap().contains("JSON"));
        assert_eq!(
            handle(&c, &r("POST", "/network/xyz", "{}")).await.status,
            400
        );
        // Well-formed, but no node to join with.
        assert_eq!(
            handle(&c, &r("POST", "/network/8056c2e21c000001", "{}"))
                .await
                .status,
            503
        );
        assert_eq!(
            handle(&c, &r("GET", "/network/8056c2e21c000001", ""))
                .await
                .status,
            404
        );
        assert_eq!(
            handle(&c, &r("GET", "/peer/0123456789", "")).await.status,
            404
        );
        let s = handle(&c, &r("GET", "/status", "")).await.body;
        assert_eq!(s["online"], json!(false));
        assert_eq!(s["config"]["settings"]["primaryPort"], json!(9993));
        let mut cc = ctx("secret");
        cc.controller = true;
        let st = handle(&cc, &r("GET", "/controller", "")).await;
        assert_eq!(st.body["controller"], json!(true));
    }
}
