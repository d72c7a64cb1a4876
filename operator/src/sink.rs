//! Where the reconcilers write controller networks and members: the [`ControllerSink`]
//! trait, and [`HttpSink`], its implementation over a `flatwire-agent --controller`'s local
//! HTTP API (ZeroTier One's controller API: `GET /controller/network`, `POST|DELETE
//! /controller/network/<nwid>` and `.../member[/<address>]`, token in the `X-ZT1-Auth`
//! header), plus flatwire's pod bindings (`.../pod/<uid>`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long one controller API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest controller API answer read.
const MAX_ANSWER: usize = 1 << 20;

/// A boxed future of a sink call.
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// Why a write to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The controller could not be reached or the exchange broke off.
    #[error("controller API {url}: {reason}")]
    Unreachable {
        /// The request URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The controller answered with an error status.
    #[error("controller API {method} {url} answered {status}: {body}")]
    Status {
        /// The request method.
        method: String,
        /// The request URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The answer body (truncated).
        body: String,
    },
}

/// The controller's store as the reconcilers see it. Every call is idempotent.
pub trait ControllerSink: Send + Sync {
    /// Creates or updates network `nwid` with the fields of `body` (a controller network
    /// object, possibly partial).
    fn put_network<'a>(&'a self, nwid: u64, body: &'a Value) -> SinkFuture<'a, Value>;
    /// Creates or updates member `address` of `nwid` with the fields of `body`; returns the
    /// stored member (with the controller's assignments).
    fn put_member<'a>(
        &'a self,
        nwid: u64,
        address: &'a str,
        body: &'a Value,
    ) -> SinkFuture<'a, Value>;
    /// Deauthorizes member `address` of `nwid` and removes it from the store (no error when
    /// it is already gone).
    fn delete_member<'a>(&'a self, nwid: u64, address: &'a str) -> SinkFuture<'a, ()>;
    /// Member `address` of `nwid` as the controller stores it (with its `ipAssignments`),
    /// `None` when the controller has no such member (or network).
    fn get_member<'a>(&'a self, nwid: u64, address: &'a str) -> SinkFuture<'a, Option<Value>>;
    /// Creates or updates the host member `address` of `nwid` (a node's agent): authorized,
    /// its identity pinned to `identity` (a public identity string, so it can vouch for
    /// pods before it ever asked for a config), named `name`, and with `ips` (when not
    /// empty) as its IP assignments.
    fn put_host_member<'a>(
        &'a self,
        nwid: u64,
        address: &'a str,
        identity: &'a str,
        name: &'a str,
        ips: &'a [String],
    ) -> SinkFuture<'a, Value> {
        Box::pin(async move {
            let mut body =
                serde_json::json!({"authorized": true, "identity": identity, "name": name});
            if !ips.is_empty() {
                body["ipAssignments"] = serde_json::json!(ips);
            }
            self.put_member(nwid, address, &body).await
        })
    }
    /// The pod bindings of `nwid` (a flatwire controller extension): `{"<uid>": binding}`,
    /// empty when the network does not exist.
    fn list_pods<'a>(&'a self, nwid: u64) -> SinkFuture<'a, Value>;
    /// Creates or updates the binding of pod `uid` on `nwid` with the fields of `body`
    /// (`namespace`, `name`, `host`, `tags`, and when the binding is new, `ipAssignments`:
    /// the IPs its pod's member gets); returns the stored binding.
    fn put_pod<'a>(&'a self, nwid: u64, uid: &'a str, body: &'a Value) -> SinkFuture<'a, Value>;
    /// Deletes the binding of pod `uid` on `nwid`; the controller removes the members it
    /// authorized and revokes them (no error when it is already gone).
    fn delete_pod<'a>(&'a self, nwid: u64, uid: &'a str) -> SinkFuture<'a, ()>;
    /// The IDs of every network the controller holds (of any controller address).
    fn list_networks(&self) -> SinkFuture<'_, Vec<u64>>;
    /// The addresses of the members of `nwid`, empty when the network does not exist.
    fn list_members(&self, nwid: u64) -> SinkFuture<'_, Vec<String>>;
    /// Deletes network `nwid` with whatever members and bindings it still has (no error
    /// when it is already gone). The controller revokes nothing: delete the bindings and
    /// members first.
    fn delete_network(&self, nwid: u64) -> SinkFuture<'_, ()>;
}

/// Why `--controller-api` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not `http://HOST:PORT[/PREFIX]`.
    #[error("controller API URL {0:?} is not http://HOST:PORT[/PREFIX] (https is not supported)")]
    Format(String),
}

/// A `flatwire-agent --controller` (or ZeroTier One controller) reached over HTTP.
#[derive(Clone)]
pub struct HttpSink {
    authority: String,
    prefix: String,
    token: String,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("authority", &self.authority)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// A sink for the API at `url` (`http://HOST:PORT`, optionally with a path prefix)
    /// authenticated with `token`.
    pub fn new(url: &str, token: &str) -> Result<Self, UrlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| UrlError::Format(url.into()))?;
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(UrlError::Format(url.into()));
        }
        let prefix = prefix.trim_end_matches('/');
        Ok(Self {
            authority: authority.to_owned(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("/{prefix}")
            },
            token: token.trim().to_owned(),
        })
    }

    /// One request; `Ok((status, body))` for any answer.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), SinkError> {
        let url = format!("http://{}{}{path}", self.authority, self.prefix);
        let unreachable = |reason: String| SinkError::Unreachable {
            url: url.clone(),
            reason,
        };
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let data = body.map(Value::to_string).unwrap_or_default();
            let req = Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", self.prefix))
                .header("Host", &self.authority)
                .header("X-ZT1-Auth", &self.token)
                .header("Content-Type", "application/json")
                .header("Connection", "close")
                .body(Full::new(Bytes::from(data)))
                .map_err(|e| unreachable(e.to_string()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            conn.abort();
            Ok::<_, SinkError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer in {REQUEST_TIMEOUT:?}")))??;
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned())
        });
        Ok((status, value))
    }

    /// A request that must answer 200 (or, with `missing_ok`, 404).
    async fn expect_ok(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        missing_ok: bool,
    ) -> Result<Value, SinkError> {
        let (status, value) = self.request(method.clone(), path, body).await?;
        if status == StatusCode::OK || (missing_ok && status == StatusCode::NOT_FOUND) {
            return Ok(value);
        }
        Err(self.status_error(&method, path, status, &value))
    }

    /// The error for an answer with an unexpected `status`.
    fn status_error(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        value: &Value,
    ) -> SinkError {
        let mut text = value.to_string();
        text.truncate(500);
        SinkError::Status {
            method: method.to_string(),
            url: format!("http://{}{}{path}", self.authority, self.prefix),
            status: status.as_u16(),
            body: text,
        }
    }
}

fn network_path(nwid: u64) -> String {
    format!("/controller/network/{nwid:016x}")
}

impl ControllerSink for HttpSink {
    fn put_network<'a>(&'a self, nwid: u64, body: &'a Value) -> SinkFuture<'a, Value> {
        let path = network_path(nwid);
        Box::pin(async move { self.expect_ok(Method::POST, &path, Some(body), false).await })
    }

    fn put_member<'a>(
        &'a self,
        nwid: u64,
        address: &'a str,
        body: &'a Value,
    ) -> SinkFuture<'a, Value> {
        let path = format!("{}/member/{address}", network_path(nwid));
        Box::pin(async move { self.expect_ok(Method::POST, &path, Some(body), false).await })
    }

    fn get_member<'a>(&'a self, nwid: u64, address: &'a str) -> SinkFuture<'a, Option<Value>> {
        let path = format!("{}/member/{address}", network_path(nwid));
        Box::pin(async move {
            match self.request(Method::GET, &path, None).await? {
                (StatusCode::OK, v) => Ok(Some(v)),
                (StatusCode::NOT_FOUND, _) => Ok(None),
                (status, v) => Err(self.status_error(&Method::GET, &path, status, &v)),
            }
        })
    }

    fn delete_member<'a>(&'a self, nwid: u64, address: &'a str) -> SinkFuture<'a, ()> {
        let path = format!("{}/member/{address}", network_path(nwid));
        Box::pin(async move {
            // Deauthorize first, so a controller that keeps deleted members (or a delete
            // that fails halfway) leaves the member unable to get a config.
            let deauth = serde_json::json!({"authorized": false});
            self.expect_ok(Method::POST, &path, Some(&deauth), true)
                .await?;
            self.expect_ok(Method::DELETE, &path, None, true).await?;
            Ok(())
        })
    }

    fn list_pods<'a>(&'a self, nwid: u64) -> SinkFuture<'a, Value> {
        let path = format!("{}/pod", network_path(nwid));
        Box::pin(async move {
            match self.request(Method::GET, &path, None).await? {
                (StatusCode::OK, v) => Ok(v),
                (StatusCode::NOT_FOUND, _) => Ok(Value::Object(Default::default())),
                (status, v) => Err(self.status_error(&Method::GET, &path, status, &v)),
            }
        })
    }

    fn put_pod<'a>(&'a self, nwid: u64, uid: &'a str, body: &'a Value) -> SinkFuture<'a, Value> {
        let path = format!("{}/pod/{uid}", network_path(nwid));
        Box::pin(async move { self.expect_ok(Method::POST, &path, Some(body), false).await })
    }

    fn delete_pod<'a>(&'a self, nwid: u64, uid: &'a str) -> SinkFuture<'a, ()> {
        let path = format!("{}/pod/{uid}", network_path(nwid));
        Box::pin(async move {
            self.expect_ok(Method::DELETE, &path, None, true).await?;
            Ok(())
        })
    }

    fn list_networks(&self) -> SinkFuture<'_, Vec<u64>> {
        Box::pin(async move {
            let path = "/controller/network";
            let list = self.expect_ok(Method::GET, path, None, false).await?;
            parse_network_list(&list)
                .ok_or_else(|| self.status_error(&Method::GET, path, StatusCode::OK, &list))
        })
    }

    fn list_members(&self, nwid: u64) -> SinkFuture<'_, Vec<String>> {
        let path = format!("{}/member", network_path(nwid));
        Box::pin(async move {
            match self.request(Method::GET, &path, None).await? {
                (StatusCode::OK, Value::Object(m)) => Ok(m.into_iter().map(|(a, _)| a).collect()),
                (StatusCode::NOT_FOUND, _) => Ok(Vec::new()),
                (status, v) => Err(self.status_error(&Method::GET, &path, status, &v)),
            }
        })
    }

    fn delete_network(&self, nwid: u64) -> SinkFuture<'_, ()> {
        let path = network_path(nwid);
        Box::pin(async move {
            self.expect_ok(Method::DELETE, &path, None, true).await?;
            Ok(())
        })
    }
}

/// The network IDs of a `GET /controller/network` answer (an array of 16-hex-digit
/// strings), `None` when it is not one.
fn parse_network_list(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?
        .iter()
        .map(|id| {
            let s = id.as_str().filter(|s| s.len() == 16)?;
            u64::from_str_radix(s, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let s = HttpSink::new("http://127.0.0.1:9993", " tok\n").unwrap();
        assert_eq!(
            (s.authority.as_str(), s.prefix.as_str()),
            ("127.0.0.1:9993", "")
        );
        assert_eq!(s.token, "tok");
        let s = HttpSink::new("http://ctl.flatwire:80/api/", "t").unwrap();
        assert_eq!(s.prefix, "/api");
        for bad in [
            "https://h:1",
            "127.0.0.1:9993",
            "http://host",
            "http://:80",
            "http://h:x",
        ] {
            let e = HttpSink::new(bad, "t").unwrap_err();
            assert!(e.to_string().contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn network_lists_parse() {
        let v = serde_json::json!(["89e92ceee5000007", "0123456789abcdef"]);
        assert_eq!(
            parse_network_list(&v),
            Some(vec![0x89e9_2cee_e500_0007, 0x0123_4567_89ab_cdef])
        );
        assert_eq!(parse_network_list(&serde_json::json!([])), Some(vec![]));
        for bad in [
            serde_json::json!({"89e92ceee5000007": 1}),
            serde_json::json!(["89e92ceee500007"]),
            serde_json::json!(["89e92ceee500000x"]),
            serde_json::json!([7]),
        ] {
            assert_eq!(parse_network_list(&bad), None, "{bad}");
        }
    }
}
