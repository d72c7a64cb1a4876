//! The real tools the tests run, with every version pinned in one place.
//!
//! `cargo xtask tools` installs what this table names; the harness finds the binaries here.
//! A tool that is missing is an error that says how to get it: tests never skip silently.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// Where a tool comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Debian package, installed with apt-get; the binaries are on the system `PATH`.
    Debian {
        /// The package name.
        package: &'static str,
    },
    /// Go `main` packages built by `go install PACKAGE@VERSION` into the tool's cache directory.
    GoInstall {
        /// The module path the packages live in (versioned as a whole).
        module: &'static str,
        /// Package paths, relative to the module, one per binary.
        packages: &'static [&'static str],
        /// `-X` linker flags (`symbol=value`) that stamp the version into the binaries.
        version_ldflags: &'static [&'static str],
    },
    /// Go `main` packages built from the pinned module under `xtask/gotools`.
    GoModule {
        /// Package paths (full import paths or `./dir` inside the module), one per binary.
        packages: &'static [&'static str],
        /// `-X` linker flags (`symbol=value`) that stamp the version into the binaries.
        version_ldflags: &'static [&'static str],
    },
}

/// One pinned tool (or family of binaries built together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// Name used in the cache directory and the tools table.
    pub name: &'static str,
    /// The pinned version (for Debian packages: the release we install from, informative).
    pub version: &'static str,
    /// The binaries this tool provides.
    pub binaries: &'static [&'static str],
    /// Where it comes from.
    pub source: Source,
}

/// The pinned Kubernetes release (kube-apiserver, kubectl, kubelet; k8s-openapi 0.29 covers it).
pub const KUBERNETES_VERSION: &str = "v1.35.4";
/// The etcd release built from Go modules (the one the pinned Kubernetes requires).
pub const ETCD_VERSION: &str = "v3.6.5";

/// Every tool the tests need, with its pinned version.
pub const TOOLS: &[Tool] = &[
    Tool {
        name: "iproute2",
        version: "debian-12",
        binaries: &["ip"],
        source: Source::Debian {
            package: "iproute2",
        },
    },
    Tool {
        name: "iptables",
        version: "debian-12",
        binaries: &["iptables", "ip6tables"],
        source: Source::Debian {
            package: "iptables",
        },
    },
    Tool {
        name: "iperf3",
        version: "debian-12",
        binaries: &["iperf3"],
        source: Source::Debian { package: "iperf3" },
    },
    Tool {
        name: "ping",
        version: "debian-12",
        binaries: &["ping"],
        source: Source::Debian {
            package: "iputils-ping",
        },
    },
    Tool {
        name: "tcpdump",
        version: "debian-12",
        binaries: &["tcpdump"],
        source: Source::Debian { package: "tcpdump" },
    },
    Tool {
        name: "curl",
        version: "debian-12",
        binaries: &["curl"],
        source: Source::Debian { package: "curl" },
    },
    Tool {
        name: "openssl",
        version: "debian-12",
        binaries: &["openssl"],
        source: Source::Debian { package: "openssl" },
    },
    Tool {
        name: "helm",
        version: "v3.22.0",
        binaries: &["helm"],
        source: Source::GoInstall {
            module: "helm.sh/helm/v3",
            packages: &["cmd/helm"],
            version_ldflags: &["helm.sh/helm/v3/internal/version.version=v3.22.0"],
        },
    },
    Tool {
        name: "cnitool",
        version: "v1.3.1",
        binaries: &["cnitool"],
        source: Source::GoInstall {
            module: "github.com/containernetworking/cni",
            packages: &["cnitool"],
            version_ldflags: &[],
        },
    },
    Tool {
        name: "cni-plugins",
        version: "v1.9.1",
        binaries: &[
            "bridge",
            "host-local",
            "loopback",
            "portmap",
            "bandwidth",
            "tuning",
        ],
        source: Source::GoInstall {
            module: "github.com/containernetworking/plugins",
            packages: &[
                "plugins/main/bridge",
                "plugins/ipam/host-local",
                "plugins/main/loopback",
                "plugins/meta/portmap",
                "plugins/meta/bandwidth",
                "plugins/meta/tuning",
            ],
            version_ldflags: &[
                "github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=v1.9.1",
            ],
        },
    },
    Tool {
        name: "kubernetes",
        version: KUBERNETES_VERSION,
        binaries: &["kube-apiserver", "kubectl", "kubelet"],
        source: Source::GoModule {
            packages: &[
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "k8s.io/kubernetes/cmd/kubectl",
                "k8s.io/kubernetes/cmd/kubelet",
            ],
            version_ldflags: &[
                "k8s.io/component-base/version.gitVersion=v1.35.4",
                "k8s.io/component-base/version.gitMajor=1",
                "k8s.io/component-base/version.gitMinor=35",
                "k8s.io/component-base/version.gitTreeState=clean",
                "k8s.io/client-go/pkg/version.gitVersion=v1.35.4",
                "k8s.io/client-go/pkg/version.gitMajor=1",
                "k8s.io/client-go/pkg/version.gitMinor=35",
            ],
        },
    },
    Tool {
        name: "etcd",
        version: ETCD_VERSION,
        binaries: &["etcd"],
        source: Source::GoModule {
            packages: &["./etcd"],
            version_ldflags: &[],
        },
    },
];

/// The root of the tool cache: `$FLATWIRE_TOOLS_DIR`, else `~/.cache/flatwire/tools`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLATWIRE_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/flatwire/tools")
}

impl Tool {
    /// The directory a Go-built tool is cached in: `<cache root>/<name>-<version>`.
    pub fn cache_dir(&self) -> PathBuf {
        cache_root().join(format!("{}-{}", self.name, self.version))
    }

    /// Where `binary` of this tool is (or will be) installed.
    pub fn binary_path(&self, binary: &str) -> PathBuf {
        match self.source {
            Source::Debian { .. } => which(binary).unwrap_or_else(|| PathBuf::from(binary)),
            Source::GoInstall { .. } | Source::GoModule { .. } => self.cache_dir().join(binary),
        }
    }
}

/// Finds `name` on the system `PATH` (plus the sbin directories root has).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The path of a pinned tool's binary; an error naming the fix when it is not installed.
pub fn bin(binary: &str) -> Result<PathBuf, HarnessError> {
    let tool = TOOLS
        .iter()
        .find(|t| t.binaries.contains(&binary))
        .ok_or_else(|| HarnessError::UnknownTool(binary.to_owned()))?;
    let path = tool.binary_path(binary);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::ToolMissing {
            binary: binary.to_owned(),
            path,
        })
    }
}

/// The directory holding the reference CNI plugins (a `CNI_PATH` entry).
pub fn cni_plugin_dir() -> Result<PathBuf, HarnessError> {
    let bridge = bin("bridge")?;
    Ok(bridge
        .parent()
        .expect("a cached binary has a parent directory")
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_binary_belongs_to_exactly_one_tool() {
        let mut seen = std::collections::HashSet::new();
        for tool in TOOLS {
            for b in tool.binaries {
                assert!(seen.insert(*b), "{b} is listed twice");
            }
        }
        assert!(matches!(
            bin("no-such-tool"),
            Err(HarnessError::UnknownTool(_))
        ));
    }

    #[test]
    fn go_module_pins_match_the_table() {
        let go_mod = include_str!("../../xtask/gotools/go.mod");
        let want = [
            format!("k8s.io/kubernetes {KUBERNETES_VERSION}"),
            format!("go.etcd.io/etcd/server/v3 {ETCD_VERSION}"),
            format!(
                "k8s.io/api => k8s.io/api v0.{}",
                KUBERNETES_VERSION.trim_start_matches("v1.")
            ),
        ];
        for line in want {
            assert!(
                go_mod.contains(&line),
                "xtask/gotools/go.mod lacks {line:?}"
            );
        }
    }
}
