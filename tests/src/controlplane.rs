//! A real Kubernetes control plane on loopback: etcd and kube-apiserver of the pinned
//! versions, with certificates generated for the run, stopped by PID when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::HarnessError;
use crate::netns::run_checked;
use crate::process::Proc;
use crate::tools;

/// How long etcd and the API server get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running etcd + kube-apiserver pair with an admin kubeconfig.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: the API server stops before etcd, the directory goes last.
    apiserver: Proc,
    etcd: Proc,
    etcd_url: String,
    server_url: String,
    secure_port: u16,
    kubeconfig: PathBuf,
    dir: TempDir,
}

impl ControlPlane {
    /// Generates certificates, starts etcd and kube-apiserver on free loopback ports and
    /// waits until `/readyz` answers `ok`.
    pub fn start() -> Result<Self, HarnessError> {
        let etcd_bin = tools::bin("etcd")?;
        tools::bin("kube-apiserver")?;
        tools::bin("kubectl")?;
        let dir = tempfile::Builder::new()
            .prefix("flatwire-cp-")
            .tempdir()
            .map_err(|e| HarnessError::Io("control-plane directory".into(), e))?;
        let d = dir.path();
        make_certificates(d)?;

        let (client_port, peer_port, secure_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Proc::spawn(
            "etcd",
            Command::new(etcd_bin)
                .args(["--name", "fw", "--data-dir"])
                .arg(d.join("etcd"))
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("fw={peer_url}")])
                .args(["--log-level", "warn", "--log-outputs"])
                .arg(d.join("etcd.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(d, "etcd.stderr")?),
        )?;
        wait_until("etcd", &mut etcd, &d.join("etcd.log"), || {
            http_get(client_port, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
        })?;

        let server_url = format!("https://127.0.0.1:{secure_port}");
        let kubeconfig = d.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, d, &server_url)?;
        let apiserver = start_apiserver(d, &etcd_url, secure_port, &kubeconfig)?;
        Ok(Self {
            apiserver,
            etcd,
            etcd_url,
            server_url,
            secure_port,
            kubeconfig,
            dir,
        })
    }

    /// Stops the API server (etcd keeps running and keeps the objects): clients see a
    /// control plane that does not answer until [`Self::restart_apiserver`].
    pub fn stop_apiserver(&mut self) {
        self.apiserver.stop();
    }

    /// Starts the API server again (same port, certificates and etcd) after
    /// [`Self::stop_apiserver`] and waits until `/readyz` answers `ok`.
    pub fn restart_apiserver(&mut self) -> Result<(), HarnessError> {
        self.apiserver.stop();
        self.apiserver = start_apiserver(
            self.dir.path(),
            &self.etcd_url,
            self.secure_port,
            &self.kubeconfig,
        )?;
        Ok(())
    }

    /// The admin kubeconfig (client certificate in group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The directory holding certificates, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PIDs of etcd and the API server.
    pub fn pids(&self) -> [u32; 2] {
        [self.etcd.pid(), self.apiserver.pid()]
    }

    /// A `kubectl` command already pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        kubectl_with(&self.kubeconfig).expect("kubectl was found when the control plane started")
    }

    /// Runs `kubectl args`; an error carries its stderr.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String, HarnessError> {
        let out = run_checked(self.kubectl().args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Starts kube-apiserver on `secure_port` with the certificates in `d` against etcd at
/// `etcd_url` and waits until `/readyz` answers `ok` through `kubeconfig`.
fn start_apiserver(
    d: &Path,
    etcd_url: &str,
    secure_port: u16,
    kubeconfig: &Path,
) -> Result<Proc, HarnessError> {
    let cert = |name: &str| d.join(name).to_string_lossy().into_owned();
    let mut apiserver = Proc::spawn(
        "kube-apiserver",
        Command::new(tools::bin("kube-apiserver")?)
            .arg(format!("--etcd-servers={etcd_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={secure_port}"))
            .arg(format!("--tls-cert-file={}", cert("server.crt")))
            .arg(format!("--tls-private-key-file={}", cert("server.key")))
            .arg(format!("--client-ca-file={}", cert("ca.crt")))
            .arg(format!("--service-account-key-file={}", cert("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                cert("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--authorization-mode=Node,RBAC")
            .arg(format!("--cert-dir={}", cert("apiserver-certs")))
            .arg("--profiling=false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(d, "kube-apiserver.log")?),
    )?;
    wait_until(
        "kube-apiserver",
        &mut apiserver,
        &d.join("kube-apiserver.log"),
        || {
            kubectl_with(kubeconfig).is_ok_and(|mut c| {
                c.args(["get", "--raw", "/readyz"])
                    .output()
                    .is_ok_and(|o| o.status.success() && o.stdout == b"ok")
            })
        },
    )?;
    Ok(apiserver)
}

fn kubectl_with(kubeconfig: &Path) -> Result<Command, HarnessError> {
    let mut cmd = Command::new(tools::bin("kubectl")?);
    cmd.arg("--kubeconfig").arg(kubeconfig);
    Ok(cmd)
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, HarnessError> {
    std::fs::File::create(dir.join(name)).map_err(|e| HarnessError::Io(name.into(), e))
}

/// Polls `ready` until it holds; fails early if the process exits, with its log's tail.
fn wait_until(
    what: &str,
    proc: &mut Proc,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        let exited = proc.try_status();
        if exited.is_some() || Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            return Err(HarnessError::NotReady {
                what: what.to_owned(),
                why: exited.map_or_else(
                    || format!("not ready after {READY_TIMEOUT:?}"),
                    |s| format!("exited with {s}"),
                ),
                log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, HarnessError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HarnessError::Io("free port".into(), e))
}

/// A plain HTTP/1.0 GET on loopback; the body when the server answered at all.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), HarnessError> {
    run_checked(
        Command::new(tools::bin("openssl")?)
            .current_dir(dir)
            .args(args),
    )
    .map(drop)
}

/// Writes a CA, the API server's serving certificate, an admin client certificate and the
/// service-account key pair (all P-256, valid one day) into `dir`.
fn make_certificates(dir: &Path) -> Result<(), HarnessError> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "1",
                "-subj",
                "/CN=flatwire-test-ca",
            ],
        ]
        .concat(),
    )?;
    let sign = |name: &str, subject: &str, ext: &str| -> Result<(), HarnessError> {
        std::fs::write(dir.join(format!("{name}.ext")), ext)
            .map_err(|e| HarnessError::Io(format!("{name}.ext"), e))?;
        let (key, csr, crt, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(
            dir,
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", subject],
            ]
            .concat(),
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "1",
                "-extfile",
                &extf,
            ],
        )
    };
    sign(
        "server",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
    )?;
    sign(
        "admin",
        "/O=system:masters/CN=flatwire-admin",
        "extendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

fn write_kubeconfig(path: &Path, dir: &Path, server: &str) -> Result<(), HarnessError> {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: flatwire-test\n  cluster:\n    \
         server: {server}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    \
         client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: admin\n  \
         context:\n    cluster: flatwire-test\n    user: admin\ncurrent-context: admin\n",
        ca = p("ca.crt"),
        crt = p("admin.crt"),
        key = p("admin.key"),
    );
    std::fs::write(path, text).map_err(|e| HarnessError::Io(path.display().to_string(), e))
}
