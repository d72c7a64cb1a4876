//! A real tonic server on a temporary Unix socket, reached through the crate's client helpers.

use std::time::Duration;

use flatwire_api::v1::{self, agent_server::Agent};
use flatwire_api::{AgentServer, ClientError, ClientOptions, connect, connect_checked};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// Answers Status; everything else is unimplemented (the real agent lives in flatwire-agent).
struct StatusOnly {
    api_version: &'static str,
}

#[tonic::async_trait]
impl Agent for StatusOnly {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(v1::StatusResponse {
            agent_version: "test".into(),
            api_version: self.api_version.into(),
            ready: false,
            node_address: String::new(),
            not_ready_reasons: vec!["testing".into()],
        }))
    }
    async fn attach(
        &self,
        _: Request<v1::AttachRequest>,
    ) -> Result<Response<v1::AttachResponse>, Status> {
        Err(Status::unimplemented("attach"))
    }
    async fn detach(
        &self,
        _: Request<v1::DetachRequest>,
    ) -> Result<Response<v1::DetachResponse>, Status> {
        Err(Status::unimplemented("detach"))
    }
    async fn check(
        &self,
        _: Request<v1::CheckRequest>,
    ) -> Result<Response<v1::CheckResponse>, Status> {
        Err(Status::unimplemented("check"))
    }
    async fn list_attachments(
        &self,
        _: Request<v1::ListAttachmentsRequest>,
    ) -> Result<Response<v1::ListAttachmentsResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
    async fn garbage_collect(
        &self,
        _: Request<v1::GarbageCollectRequest>,
    ) -> Result<Response<v1::GarbageCollectResponse>, Status> {
        Err(Status::unimplemented("gc"))
    }
}

fn serve(path: &std::path::Path, api_version: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(StatusOnly { api_version }))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    })
}

#[tokio::test]
async fn status_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let server = serve(&sock, "v1");

    let (mut client, status) = connect_checked(&sock, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(status.api_version, "v1");
    assert!(!status.ready);
    assert_eq!(status.not_ready_reasons, ["testing"]);

    // The same channel carries further calls; unimplemented ones come back as gRPC errors.
    let err = client
        .attach(v1::AttachRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    server.abort();
}

#[tokio::test]
async fn version_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let server = serve(&sock, "v2");
    let err = connect_checked(&sock, ClientOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Version { ref agent } if agent == "v2"),
        "{err}"
    );
    server.abort();
}

#[tokio::test]
async fn missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("no-agent-here.sock");
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: None,
    };
    let err = connect(&sock, options).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
}

#[tokio::test]
async fn socket_without_listener_names_the_path() {
    // A stale socket file (agent died without cleaning up): connection refused.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let err = connect(&sock, ClientOptions::default()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    assert!(msg.contains("refused"), "{msg}");
}
