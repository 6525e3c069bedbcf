//! Attaching to a running RootlessKit: `run --rootlesskit-state-dir DIR`.
//!
//! RootlessKit keeps its state in one directory: `child_pid` (the PID of
//! the process in the child namespaces) and `api.sock` (its API, which
//! dockerd, nerdctl and rootlessctl call to publish ports). Attaching means:
//!
//! 1. read `child_pid`: the forwarder dials in that process's namespaces;
//! 2. ask RootlessKit's own API (`GET /v1/info`) whether it runs a port
//!    driver itself; if it does, refuse, so two drivers never fight over
//!    the same ports;
//! 3. set RootlessKit's socket aside as `api.sock.rootlesskit` and serve
//!    the forwarder's API at `api.sock`, so every client finds it where it
//!    looks;
//! 4. on exit, put RootlessKit's socket back.
//!
//! If the forwarder was killed before step 4, the next start finds the
//! socket set aside and a stale `api.sock` of its own: it takes over again
//! from there (and puts the original back on its own exit), so nothing is
//! lost. [`plan`] makes that decision from what is on disk; it is pure and
//! table-tested.
//!
//! Rootless Docker 20.10 starts RootlessKit without `--state-dir`: its
//! state directory is a random `rootlesskit*` directory in the temporary
//! directory, found only in dockerd's environment (`ROOTLESSKIT_STATE_DIR`).
//! [`find_docker_state_dir`] reads it from there for `forwarder
//! attach-docker`.

use std::io;
use std::path::{Path, PathBuf};

/// The API socket's name inside a state directory.
pub(crate) const API_SOCK: &str = "api.sock";
/// Where RootlessKit's own socket is kept while the forwarder serves.
pub(crate) const ASIDE: &str = "api.sock.rootlesskit";
/// The child PID file inside a state directory.
pub(crate) const CHILD_PID: &str = "child_pid";

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot read {path}: {cause} (is {dir} a RootlessKit state directory?)")]
    ChildPid {
        path: PathBuf,
        dir: PathBuf,
        cause: io::Error,
    },
    #[error("{path} does not hold a PID: {content:?}")]
    BadPid { path: PathBuf, content: String },
    #[error(
        "RootlessKit at {dir} runs its own port driver ({driver}): two drivers would fight over \
         the same ports. Start RootlessKit with --port-driver=none (rootless Docker: \
         DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=none)"
    )]
    HasPortDriver { dir: PathBuf, driver: String },
    #[error("another forwarder already serves {0}")]
    InUse(PathBuf),
    #[error("cannot ask RootlessKit at {path} for its info: {cause}")]
    Info { path: PathBuf, cause: String },
    #[error("cannot set RootlessKit's socket aside ({from} -> {to}): {cause}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        cause: io::Error,
    },
    #[error("no rootless dockerd of uid {uid} found (looked for a `dockerd` process with ROOTLESSKIT_STATE_DIR in its environment)")]
    NoDocker { uid: u32 },
    #[error("{n} rootless dockerd processes of uid {uid} found ({dirs}); pass --rootlesskit-state-dir DIR to choose")]
    ManyDockers { uid: u32, n: usize, dirs: String },
}

/// What is at the API path and beside it when the forwarder starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OnDisk {
    /// `api.sock` exists and something accepts connections on it.
    pub api_live: bool,
    /// `api.sock` exists (live or stale).
    pub api_exists: bool,
    /// `api.sock.rootlesskit` exists: set aside by an earlier forwarder.
    pub aside_exists: bool,
}

/// What to do with the state directory's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// `api.sock` is RootlessKit's, live: ask it whether it runs a port
    /// driver, then set it aside.
    AskThenSetAside,
    /// RootlessKit's socket is already aside (an earlier forwarder was
    /// killed); `api.sock`, if any, is that forwarder's stale socket and is
    /// replaced. Ask the socket set aside (if it still answers) about its
    /// port driver.
    AlreadyAside,
    /// Nothing to set aside (RootlessKit without an API socket, or a stale
    /// one): serve at `api.sock`; nothing to restore on exit.
    Serve,
    /// Another forwarder serves `api.sock` (RootlessKit's socket is aside
    /// and `api.sock` answers).
    Refuse,
}

/// Decides from what is on disk (see the module comment).
pub(crate) fn plan(d: OnDisk) -> Plan {
    match (d.aside_exists, d.api_live) {
        (true, true) => Plan::Refuse,
        (true, false) => Plan::AlreadyAside,
        (false, true) => Plan::AskThenSetAside,
        (false, false) => Plan::Serve,
    }
}

/// The port driver named in RootlessKit's `/v1/info` reply, if it runs one
/// (`portDriver` is absent or null with `--port-driver=none`).
pub(crate) fn port_driver(info: &serde_json::Value) -> Option<String> {
    match info.get("portDriver") {
        None | Some(serde_json::Value::Null) => None,
        Some(pd) => Some(
            pd.get("driver")
                .and_then(|d| d.as_str())
                .unwrap_or("unknown")
                .to_string(),
        ),
    }
}

/// Reads a PID file: one decimal number, surrounding white space allowed.
pub(crate) fn parse_pid(content: &str) -> Option<u32> {
    content.trim().parse::<u32>().ok().filter(|&p| p > 0)
}

/// A state directory the forwarder has attached to. [`Attachment::restore`]
/// puts RootlessKit's socket back (call it at exit, after the forwarder's
/// own API socket has stopped serving).
#[derive(Debug)]
pub(crate) struct Attachment {
    pub child_pid: u32,
    /// Where the forwarder serves its API.
    pub api_socket: PathBuf,
    /// RootlessKit's `networkDriver` info, passed on in the forwarder's
    /// own `/v1/info`.
    pub network_driver: Option<serde_json::Value>,
    aside: Option<PathBuf>,
}

fn socket_answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

impl Attachment {
    /// Attaches to the state directory `dir` (steps 1-3 of the module
    /// comment). `ask_info` performs `GET /v1/info` on a socket.
    pub(crate) fn attach(
        dir: &Path,
        ask_info: impl Fn(&Path) -> Result<serde_json::Value, String>,
    ) -> Result<Attachment, AttachError> {
        let pid_path = dir.join(CHILD_PID);
        let content =
            std::fs::read_to_string(&pid_path).map_err(|cause| AttachError::ChildPid {
                path: pid_path.clone(),
                dir: dir.to_owned(),
                cause,
            })?;
        let child_pid = parse_pid(&content).ok_or_else(|| AttachError::BadPid {
            path: pid_path.clone(),
            content: content.chars().take(40).collect(),
        })?;
        let api = dir.join(API_SOCK);
        let aside = dir.join(ASIDE);
        let on_disk = OnDisk {
            api_live: socket_answers(&api),
            api_exists: std::fs::symlink_metadata(&api).is_ok(),
            aside_exists: std::fs::symlink_metadata(&aside).is_ok(),
        };
        let ask = |path: &Path| -> Result<Option<serde_json::Value>, AttachError> {
            let info = ask_info(path).map_err(|cause| AttachError::Info {
                path: path.to_owned(),
                cause,
            })?;
            if let Some(driver) = port_driver(&info) {
                return Err(AttachError::HasPortDriver {
                    dir: dir.to_owned(),
                    driver,
                });
            }
            Ok(info.get("networkDriver").cloned())
        };
        let (network_driver, set_aside) = match plan(on_disk) {
            Plan::Refuse => return Err(AttachError::InUse(api)),
            Plan::AskThenSetAside => {
                let nd = ask(&api)?;
                std::fs::rename(&api, &aside).map_err(|cause| AttachError::Rename {
                    from: api.clone(),
                    to: aside.clone(),
                    cause,
                })?;
                tracing::info!(socket = %api.display(), aside = %aside.display(),
                    "RootlessKit's API socket set aside; it is restored when the forwarder exits");
                (nd, true)
            }
            Plan::AlreadyAside => {
                // RootlessKit is still behind the socket set aside (if it
                // answers): it must still have no port driver.
                let nd = if socket_answers(&aside) {
                    ask(&aside)?
                } else {
                    None
                };
                tracing::info!(aside = %aside.display(),
                    "RootlessKit's API socket was left aside by an earlier forwarder; taking over");
                (nd, true)
            }
            Plan::Serve => (None, false),
        };
        Ok(Attachment {
            child_pid,
            api_socket: api,
            network_driver,
            aside: set_aside.then_some(aside),
        })
    }

    /// Puts RootlessKit's socket back at `api.sock` (replacing the
    /// forwarder's own, which must no longer be served). Idempotent.
    pub(crate) fn restore(&mut self) {
        let Some(aside) = self.aside.take() else {
            return;
        };
        let _ = std::fs::remove_file(&self.api_socket);
        match std::fs::rename(&aside, &self.api_socket) {
            Ok(()) => tracing::info!(socket = %self.api_socket.display(),
                "RootlessKit's API socket restored"),
            Err(e) => tracing::warn!(error = %e, aside = %aside.display(),
                "cannot restore RootlessKit's API socket"),
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Reads `ROOTLESSKIT_STATE_DIR` from a process environment block
/// (`/proc/PID/environ`: NUL-separated `KEY=VALUE`).
pub(crate) fn state_dir_from_environ(environ: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"ROOTLESSKIT_STATE_DIR="))
        .filter(|v| !v.is_empty())
        .map(|v| PathBuf::from(std::ffi::OsStr::from_bytes(v)))
}

/// Finds the state directory of the one rootless dockerd run by `uid`.
pub fn find_docker_state_dir(uid: u32) -> Result<PathBuf, AttachError> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs: Vec<PathBuf> = Vec::new();
    let entries = std::fs::read_dir("/proc").map_err(|_| AttachError::NoDocker { uid })?;
    for e in entries.flatten() {
        let p = e.path();
        let is_pid = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid || std::fs::metadata(&p).map(|m| m.uid()).ok() != Some(uid) {
            continue;
        }
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim_end() != "dockerd" {
            continue;
        }
        if let Some(d) = std::fs::read(p.join("environ"))
            .ok()
            .and_then(|env| state_dir_from_environ(&env))
        {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    match dirs.len() {
        0 => Err(AttachError::NoDocker { uid }),
        1 => Ok(dirs.remove(0)),
        n => Err(AttachError::ManyDockers {
            uid,
            n,
            dirs: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plan_table() {
        let d = |api_live, api_exists, aside_exists| OnDisk {
            api_live,
            api_exists,
            aside_exists,
        };
        // RootlessKit's live socket, nothing aside: ask, then set aside.
        assert_eq!(plan(d(true, true, false)), Plan::AskThenSetAside);
        // A killed forwarder left RootlessKit's socket aside and its own
        // stale one (or none) at api.sock: take over.
        assert_eq!(plan(d(false, true, true)), Plan::AlreadyAside);
        assert_eq!(plan(d(false, false, true)), Plan::AlreadyAside);
        // Aside, and api.sock answers: another forwarder is serving.
        assert_eq!(plan(d(true, true, true)), Plan::Refuse);
        // No RootlessKit socket at all, or a stale one: just serve.
        assert_eq!(plan(d(false, false, false)), Plan::Serve);
        assert_eq!(plan(d(false, true, false)), Plan::Serve);
    }

    #[test]
    fn port_driver_from_info() {
        let none = json!({"apiVersion":"1.1.1","childPID":7,
            "networkDriver":{"driver":"slirp4netns"}});
        assert_eq!(port_driver(&none), None);
        assert_eq!(port_driver(&json!({"portDriver": null})), None);
        let builtin = json!({"portDriver":{"driver":"builtin","protos":["tcp"]}});
        assert_eq!(port_driver(&builtin).as_deref(), Some("builtin"));
        assert_eq!(
            port_driver(&json!({"portDriver":{}})).as_deref(),
            Some("unknown")
        );
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pid("1234\n"), Some(1234));
        assert_eq!(parse_pid(" 42 "), Some(42));
        assert_eq!(parse_pid("0"), None);
        assert_eq!(parse_pid("x"), None);
        assert_eq!(parse_pid(""), None);
    }

    #[test]
    fn environ_parsing() {
        let env = b"HOME=/h\0ROOTLESSKIT_STATE_DIR=/tmp/rootlesskit123\0X=1\0";
        assert_eq!(
            state_dir_from_environ(env),
            Some(PathBuf::from("/tmp/rootlesskit123"))
        );
        assert_eq!(state_dir_from_environ(b"A=1\0B=2"), None);
        assert_eq!(state_dir_from_environ(b"ROOTLESSKIT_STATE_DIR=\0"), None);
        assert_eq!(state_dir_from_environ(b""), None);
    }

    fn state_dir(pid: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(CHILD_PID), pid).expect("child_pid");
        d
    }

    #[test]
    fn attach_sets_aside_and_restores() {
        let d = state_dir("4242\n");
        let api = d.path().join(API_SOCK);
        // RootlessKit's live socket.
        let _rk = std::os::unix::net::UnixListener::bind(&api).expect("bind");
        let info = |_: &Path| Ok(json!({"networkDriver":{"driver":"slirp4netns"}}));
        let mut a = Attachment::attach(d.path(), info).expect("attach");
        assert_eq!(a.child_pid, 4242);
        assert_eq!(a.api_socket, api);
        assert_eq!(a.network_driver, Some(json!({"driver":"slirp4netns"})));
        assert!(!api.exists() && d.path().join(ASIDE).exists());
        // The forwarder serves at api.sock meanwhile.
        std::fs::write(&api, "ours").expect("ours");
        a.restore();
        assert!(socket_answers(&api), "RootlessKit's socket is back");
        assert!(!d.path().join(ASIDE).exists());
    }

    #[test]
    fn attach_refuses_a_port_driver_and_touches_nothing() {
        let d = state_dir("4242");
        let api = d.path().join(API_SOCK);
        let _rk = std::os::unix::net::UnixListener::bind(&api).expect("bind");
        let info = |_: &Path| Ok(json!({"portDriver":{"driver":"builtin"}}));
        let err = Attachment::attach(d.path(), info).expect_err("refused");
        assert!(matches!(err, AttachError::HasPortDriver { .. }), "{err}");
        assert!(err.to_string().contains("--port-driver=none"), "{err}");
        assert!(socket_answers(&api) && !d.path().join(ASIDE).exists());
    }

    #[test]
    fn attach_after_a_kill_takes_over_and_restores() {
        let d = state_dir("4242");
        let api = d.path().join(API_SOCK);
        let aside = d.path().join(ASIDE);
        // RootlessKit's socket, left aside by a killed forwarder, and that
        // forwarder's stale socket at api.sock.
        let _rk = std::os::unix::net::UnixListener::bind(&aside).expect("bind");
        drop(std::os::unix::net::UnixListener::bind(&api).expect("stale"));
        let info = |_: &Path| Ok(json!({}));
        let a = Attachment::attach(d.path(), info).expect("attach");
        drop(a);
        assert!(socket_answers(&api) && !aside.exists());
    }

    #[test]
    fn attach_refuses_a_second_forwarder_and_bad_state() {
        let d = state_dir("4242");
        let _rk = std::os::unix::net::UnixListener::bind(d.path().join(ASIDE)).expect("aside");
        let _fw = std::os::unix::net::UnixListener::bind(d.path().join(API_SOCK)).expect("api");
        let err = Attachment::attach(d.path(), |_| Ok(json!({}))).expect_err("in use");
        assert!(matches!(err, AttachError::InUse(_)), "{err}");
        let bad = state_dir("not a pid");
        let err = Attachment::attach(bad.path(), |_| Ok(json!({}))).expect_err("bad pid");
        assert!(matches!(err, AttachError::BadPid { .. }), "{err}");
        let empty = tempfile::tempdir().expect("tempdir");
        let err = Attachment::attach(empty.path(), |_| Ok(json!({}))).expect_err("no pid");
        assert!(
            err.to_string().contains("RootlessKit state directory"),
            "{err}"
        );
    }
}
