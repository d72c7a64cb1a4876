//! A small blocking client for the agent's local HTTP API (`flatwire-agent`'s ZeroTier-shaped
//! JSON API on loopback TCP): where the agent listens, which token to send, one request per
//! connection over HTTP/1.1, and errors that say what to do about them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// The agent's default state directory (where it writes `authtoken.secret`).
pub const DEFAULT_HOME: &str = "/var/lib/flatwire";
/// The agent's default port (UDP, and its local HTTP API on loopback TCP).
pub const DEFAULT_PORT: u16 = 9993;
/// The token file in the agent's state directory.
const TOKEN_FILE: &str = "authtoken.secret";
/// How long connecting may take (loopback: only a stopped or wedged agent is slow).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer may take (a join waits for the data plane).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_ANSWER: u64 = 16 << 20;

/// Exit code: the agent answered with an error (404 unknown network or member, 400, 5xx).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: bad command line or input file; nothing was sent (clap uses it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the agent could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: no usable API token (unreadable, or refused with 401).
pub const EXIT_AUTH: u8 = 4;

/// Where the agent is and how to authenticate; global options of every agent command.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Agent options")]
pub struct AgentArgs {
    /// The agent's state directory, where it keeps the API token (authtoken.secret).
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_HOME)]
    home: PathBuf,
    /// The API token itself (instead of reading HOME/authtoken.secret).
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the API token (instead of HOME/authtoken.secret).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The agent's port: its local API listens on 127.0.0.1:PORT (TCP).
    #[arg(long, global = true, value_name = "N", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// The agent's API address (HOST:PORT), when it is not 127.0.0.1:PORT (--api-listen).
    #[arg(long, global = true, value_name = "ADDR", conflicts_with = "port")]
    api: Option<String>,
    /// Print the agent's JSON answer instead of tables.
    #[arg(short = 'j', long, global = true)]
    pub json: bool,
}

/// Why a command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or an input file is wrong; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The token could not be read.
    #[error(
        "cannot read the API token from {}: {source}\n\
         The agent writes it to HOME/authtoken.secret on start (only root may read it): pass \
         --home DIR with the agent's state directory, --token-file FILE or --token TOKEN",
        path.display()
    )]
    Token {
        /// The file tried.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The agent is not reachable.
    #[error(
        "cannot reach the flatwire agent at {addr}: {reason}\n\
         Is flatwire-agent running? Start it (flatwire-agent --home {home}) or point at it with \
         --port N or --api HOST:PORT"
    )]
    Unreachable {
        /// The address tried.
        addr: String,
        /// What went wrong.
        reason: String,
        /// The state directory given (for the hint).
        home: String,
    },
    /// The agent refused the token (401).
    #[error(
        "the agent at {addr} refused the API token from {source_of_token} (401: {message})\n\
         The token is in authtoken.secret in the agent's state directory: pass --home DIR of \
         that agent, --token-file FILE or --token TOKEN"
    )]
    Unauthorized {
        /// The agent's address.
        addr: String,
        /// Where the token came from.
        source_of_token: String,
        /// The agent's message.
        message: String,
    },
    /// The agent does not run the network controller.
    #[error(
        "the agent at {0} does not run the network controller (start flatwire-agent with \
         --controller)"
    )]
    NotAController(String),
    /// The agent answered with an error.
    #[error("{what}: {message} (HTTP {status})")]
    Refused {
        /// What was asked for (`network 8056c2e21c000001`).
        what: String,
        /// The HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// What is to be created exists already.
    #[error("{0}")]
    Conflict(String),
    /// The agent answered something that is not what the API promises.
    #[error("unexpected answer from the agent at {addr}: {reason}")]
    BadAnswer {
        /// The agent's address.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Token { .. } | Self::Unauthorized { .. } => EXIT_AUTH,
            Self::Unreachable { .. } => EXIT_UNREACHABLE,
            Self::NotAController(_)
            | Self::Conflict(_)
            | Self::Refused { .. }
            | Self::BadAnswer { .. } => EXIT_REFUSED,
        })
    }
}

/// One answer: HTTP status and JSON body (`Null` when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl Answer {
    /// The agent's `{"error": ...}` message, or the status alone.
    pub fn message(&self) -> String {
        self.body["error"]
            .as_str()
            .map_or_else(|| format!("status {}", self.status), str::to_owned)
    }
}

/// A connection target and token, ready for requests.
#[derive(Debug)]
pub struct Client {
    addr: String,
    token: String,
    token_source: String,
    home: String,
}

impl Client {
    /// Resolves the address and reads the token (no request yet).
    pub fn new(args: &AgentArgs) -> Result<Self, CliError> {
        let addr = args
            .api
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", args.port));
        let (token, token_source) = match (&args.token, &args.token_file) {
            (Some(t), _) => (t.trim().to_owned(), "--token".to_owned()),
            (None, file) => {
                let path = file.clone().unwrap_or_else(|| args.home.join(TOKEN_FILE));
                let text = std::fs::read_to_string(&path).map_err(|source| CliError::Token {
                    path: path.clone(),
                    source,
                })?;
                (text.trim().to_owned(), path.display().to_string())
            }
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CliError::Usage(format!(
                "the API token from {token_source} is empty or not printable ASCII"
            )));
        }
        Ok(Self {
            addr,
            token,
            token_source,
            home: args.home.display().to_string(),
        })
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> CliError {
        CliError::Unreachable {
            addr: self.addr.clone(),
            reason: reason.to_string(),
            home: self.home.clone(),
        }
    }

    /// An error for an answer that is not what the API promises.
    pub fn bad_answer(&self, reason: impl Into<String>) -> CliError {
        CliError::BadAnswer {
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }

    fn connect(&self) -> Result<TcpStream, CliError> {
        let addrs: Vec<SocketAddr> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.unreachable(e))?
            .collect();
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(self.unreachable(last.map_or_else(
            || "the name resolves to no address".to_owned(),
            |e| e.to_string(),
        )))
    }

    /// Sends one request (`body` as JSON when given) and reads the whole answer. 401 is
    /// turned into [`CliError::Unauthorized`]; other statuses are the caller's to judge.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, CliError> {
        let mut stream = self.connect()?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| self.unreachable(e))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-ZT1-Auth: {}\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .map_err(|e| self.unreachable(format!("sending the request: {e}")))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut raw)
            .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?;
        let answer = self.parse(&raw)?;
        if answer.status == 401 {
            return Err(CliError::Unauthorized {
                addr: self.addr.clone(),
                source_of_token: self.token_source.clone(),
                message: answer.message(),
            });
        }
        Ok(answer)
    }

    /// Parses an HTTP/1.1 answer that ends at the end of the stream (`Connection: close`).
    fn parse(&self, raw: &[u8]) -> Result<Answer, CliError> {
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Err(self.bad_answer("no complete HTTP answer (is this the agent's API port?)"));
        };
        let head = String::from_utf8_lossy(&raw[..end]);
        let status = head
            .lines()
            .next()
            .filter(|l| l.starts_with("HTTP/1."))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| self.bad_answer("not an HTTP/1.x status line"))?;
        let mut body = &raw[end + 4..];
        let length = head.lines().skip(1).find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        if let Some(n) = length {
            body = body.get(..n).ok_or_else(|| {
                self.bad_answer(format!("body shorter than its Content-Length {n}"))
            })?;
        }
        let body = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) if status == 200 => {
                return Err(self.bad_answer(format!("the body is not JSON: {e}")));
            }
            Err(_) => Value::Null,
        };
        Ok(Answer { status, body })
    }

    /// `GET path`, which must answer 200; `what` names the object in errors.
    pub fn get(&self, path: &str, what: &str) -> Result<Value, CliError> {
        ok(self.request("GET", path, None)?, what)
    }

    /// `POST path` with a JSON body, which must answer 200.
    pub fn post(&self, path: &str, body: &Value, what: &str) -> Result<Value, CliError> {
        ok(self.request("POST", path, Some(body))?, what)
    }

    /// `DELETE path`, which must answer 200.
    pub fn delete(&self, path: &str, what: &str) -> Result<Value, CliError> {
        ok(self.request("DELETE", path, None)?, what)
    }

    /// Fails unless the agent runs the network controller (`GET /controller`).
    pub fn require_controller(&self) -> Result<(), CliError> {
        let a = self.request("GET", "/controller", None)?;
        match a.status {
            200 => Ok(()),
            404 => Err(CliError::NotAController(self.addr.clone())),
            _ => ok(a, "controller").map(drop),
        }
    }
}

/// The body of a 200 answer, or [`CliError::Refused`].
fn ok(a: Answer, what: &str) -> Result<Value, CliError> {
    if a.status == 200 {
        Ok(a.body)
    } else {
        Err(CliError::Refused {
            what: what.to_owned(),
            status: a.status,
            message: a.message(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client {
            addr: "127.0.0.1:9993".into(),
            token: "t".into(),
            token_source: "--token".into(),
            home: DEFAULT_HOME.into(),
        }
    }

    #[test]
    fn answers_are_parsed_up_to_their_length() {
        let a = client()
            .parse(b"HTTP/1.1 404 Not Found\r\ncontent-length: 17\r\n\r\n{\"error\": \"nope\"}xx")
            .unwrap();
        assert_eq!(a.status, 404);
        assert_eq!(a.message(), "nope");
        let a = client().parse(b"HTTP/1.1 200 OK\r\n\r\n[1]").unwrap();
        assert_eq!(a.body, serde_json::json!([1]));
    }

    #[test]
    fn broken_answers_are_named() {
        let c = client();
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[]",
            b"HTTP/1.1 200 OK\r\n\r\n<html>",
        ] {
            let e = c.parse(raw).unwrap_err();
            assert!(matches!(e, CliError::BadAnswer { .. }), "{e}");
        }
        let a = c.parse(b"HTTP/1.1 500 Oops\r\n\r\n<html>").unwrap();
        assert_eq!(a.message(), "status 500");
    }
}
