//! Child processes that are ended by PID when their guard drops, also on panic.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::HarnessError;

/// A running child process. Dropping it sends SIGTERM, waits briefly, then SIGKILLs it.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd`; `name` is used in errors.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self, HarnessError> {
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: name.to_owned(),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Takes the child's stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the exit status if the process has ended, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the process now (SIGTERM, then SIGKILL after 3 s) and reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `sig` to the process `pid` (ours: every caller passes a PID it started).
pub(crate) fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // The state is the first field after the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Builds one artifact of this workspace with cargo (`args` after `cargo build`, e.g.
/// `["-p", "flatwire-agent", "--bin", "flatwire-agent"]`) and returns the path of the
/// executable named `name` that cargo reports. Cargo's progress goes to stderr; a no-op when
/// it is up to date. Honours `CARGO` and `CARGO_TARGET_DIR` like the cargo running the test.
pub fn cargo_build(args: &[&str], name: &str) -> Result<std::path::PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build {} failed ({})",
            args.join(" "),
            out.status
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(std::path::PathBuf::from))
        .ok_or_else(|| format!("cargo build {} made no executable {name}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_guard_ends_the_process() {
        let p = Proc::spawn("sleep", Command::new("sleep").arg("60")).unwrap();
        let pid = p.pid();
        assert!(alive(pid));
        drop(p);
        assert!(!alive(pid), "pid {pid} survived its guard");
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let err = Proc::spawn("nothing", &mut Command::new("/nonexistent/flatwire")).unwrap_err();
        assert!(err.to_string().contains("nothing"), "{err}");
    }
}
