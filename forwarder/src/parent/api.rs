//! RootlessKit's v1 port API over a Unix socket, so rootlessctl, dockerd
//! and nerdctl can drive the forwarder unchanged, plus `GET /v1/stats`.
//!
//! | method, path          | success                | errors                         |
//! |-----------------------|------------------------|--------------------------------|
//! | GET /v1/ports         | 200, [PortStatus]      |                                |
//! | POST /v1/ports        | 201, PortStatus        | 400, 408 {"message"}           |
//! | DELETE /v1/ports/{id} | 200                    | 400 "bad id", "unknown id: N"  |
//! | GET /v1/info          | 200, Info              |                                |
//! | GET /v1/stats         | 200, Stats (ours)      |                                |
//!
//! Unknown paths answer 404 and unknown methods 405, both with a JSON
//! `{"message"}` body like every other error.
//!
//! Who may talk to it: the socket is created with mode 0600, and every
//! connection's peer is also checked with SO_PEERCRED, so loosening the
//! file's mode does not open it up: only the forwarder's own uid and root
//! are served; anyone else gets 403 with a `{"message"}` and one log line
//! per second at most. Requests are bounded: [`MAX_BODY`] bytes of body,
//! hyper's header limit, [`MAX_CONNECTIONS`] connections at once, and a
//! deadline for each phase of a request ([`HEAD_TIMEOUT`],
//! [`BODY_TIMEOUT`], [`WRITE_TIMEOUT`]). At the cap, a newcomer takes the
//! slot of the connection that has waited longest for a request (see
//! `conn`).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};

use tokio::net::UnixListener;

use crate::parent::port::{PortError, PortManager};
use crate::sys;
use crate::wire::spec::{ApiSpec, PortSpec};
pub use crate::wire::API_VERSION;
use crate::wire::{ErrorBody, Info, PortDriverInfo, PortStatus, SharedCounters, Stats};

mod conn;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// API connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// A request head must be complete within this long of its connection's
/// start or of the previous answer on it; otherwise the connection is
/// closed.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A request body must arrive within this long of its head; otherwise
/// reading it fails.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Writing an answer that makes no progress for this long fails, and
/// closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("another forwarder is already serving the API on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create the API socket {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
}

/// Binds the API socket with mode 0600. A stale socket file (nobody
/// listening) is replaced; a live one is refused.
/// Needs no runtime (the socket is non-blocking, ready for
/// `tokio::net::UnixListener::from_std`).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ApiSocketError> {
    let io_err = |cause| ApiSocketError::Io {
        path: path.to_owned(),
        cause,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ApiSocketError::InUse(path.to_owned())),
                Err(_) => std::fs::remove_file(path).map_err(io_err)?,
            }
        }
        Ok(_) => return Err(ApiSocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // Owner-only from the first moment: the socket controls what listens
    // on the host.
    let listener = {
        let _mask = sys::Umask::set(0o177);
        std::os::unix::net::UnixListener::bind(path).map_err(io_err)?
    };
    listener.set_nonblocking(true).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// What the handlers share.
pub struct ApiState {
    pub ports: Arc<PortManager>,
    pub state_dir: String,
    pub child_pid: Option<u32>,
    /// RootlessKit's `networkDriver` info when attached to a RootlessKit
    /// (`run --rootlesskit-state-dir`), passed on unchanged.
    pub network_driver: Option<serde_json::Value>,
}

/// An error reply: a status and `{"message": ...}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { message: self.1 })).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The router, for serving and for tests.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/ports", get(get_ports).post(post_port))
        .route("/v1/ports/{id}", delete(delete_port))
        .route("/v1/info", get(get_info))
        .route("/v1/stats", get(get_stats))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves the API until `shutdown` resolves, to this process's own uid
/// and root only, within the limits above; then lets requests in
/// progress finish their answer and returns once every connection is
/// closed.
pub async fn serve(
    listener: UnixListener,
    state: Arc<ApiState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    conn::serve(listener, router(state), shutdown).await
}

/// Whether a peer uid may use the API of a forwarder running as `own`.
pub fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// The reply to a request body that could not be read whole: too large,
/// not received in time (408: the client sent less than its
/// Content-Length and stalled past [`BODY_TIMEOUT`]), or cut short (the
/// connection ended or failed first).
fn body_error(e: axum::Error) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut why = Vec::new();
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return bad_request(format!(
                "request body is larger than {} KiB",
                MAX_BODY / 1024
            ));
        }
        if c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
        {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time: the client sent less than its \
                 Content-Length and then nothing"
                    .into(),
            );
        }
        let text = c.to_string();
        if why.last() != Some(&text) {
            why.push(text);
        }
        cause = c.source();
    }
    bad_request(format!("request body incomplete: {}", why.join(": ")))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed on {}", uri.path()),
    )
}

async fn get_ports(State(s): State<Arc<ApiState>>) -> Json<Vec<PortStatus>> {
    Json(
        s.ports
            .list()
            .into_iter()
            .map(|p| PortStatus {
                id: p.id,
                spec: p.api,
            })
            .collect(),
    )
}

async fn post_port(State(s): State<Arc<ApiState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = to_bytes(body, MAX_BODY).await.map_err(body_error)?;
    let (spec, api) = decode_port_spec(&bytes).map_err(bad_request)?;
    let st = s.ports.add(spec, api).map_err(|e| match e {
        PortError::Conflict(_)
        | PortError::UnknownId(_)
        | PortError::Listen { .. }
        | PortError::NoIpv6 { .. }
        | PortError::Taken(_)
        | PortError::NoFreePort { .. } => bad_request(e.to_string()),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(PortStatus {
            id: st.id,
            spec: st.api,
        }),
    )
        .into_response())
}

/// Decodes a `POST /v1/ports` body: the spec to publish, validated with the
/// command line's rules, and the JSON spec as given (reported back by `GET
/// /v1/ports`), or the message of the 400 reply.
pub fn decode_port_spec(body: &[u8]) -> Result<(PortSpec, ApiSpec), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid PortSpec JSON: {e}"))?;
    if !value.is_object() {
        return Err("invalid PortSpec JSON: expected an object".into());
    }
    let api: ApiSpec =
        serde_json::from_value(value).map_err(|e| format!("invalid PortSpec JSON: {e}"))?;
    let spec = PortSpec::try_from(&api)?;
    Ok((spec, api))
}

async fn delete_port(
    State(s): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let id: u32 = id
        .parse()
        .map_err(|_| bad_request(format!("bad id {id}")))?;
    s.ports
        .remove(id)
        .await
        .map(|()| StatusCode::OK)
        .map_err(|e| bad_request(e.to_string()))
}

/// The protocols this forwarder can serve right now: without IPv6 in the
/// parent namespace, no tcp6 or udp6 (dockerd then skips those mappings
/// itself).
pub fn protos() -> Vec<&'static str> {
    if sys::ipv6_available() {
        vec!["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"]
    } else {
        vec!["tcp", "tcp4", "udp", "udp4"]
    }
}

async fn get_info(State(s): State<Arc<ApiState>>) -> Json<Info> {
    Json(Info {
        api_version: API_VERSION.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        state_dir: s.state_dir.clone(),
        child_pid: s.child_pid,
        network_driver: s.network_driver.clone(),
        port_driver: PortDriverInfo {
            driver: "forwarder".into(),
            protos: protos().into_iter().map(String::from).collect(),
            disallow_loopback_child_ip: false,
            source_ip: s.ports.source_ip(),
        },
    })
}

/// The statistics of a port manager, as the API and the stdout channel
/// report them.
pub fn stats(ports: &PortManager) -> Stats {
    let (per_port, total) = ports.stats();
    Stats {
        engine: ports.engine().kind().to_string(),
        total,
        ports: per_port,
        shared: SharedCounters {
            bpf_map_entries: ports.engine().map_entries(),
            local_path: ports.engine().local_path(),
            pooled: crate::wire::Pooled {
                sockets: crate::child::netns::pooled_sockets(),
                ..crate::engine::pooled()
            },
            udp: ports.udp_total(),
        },
    }
}

async fn get_stats(State(s): State<Arc<ApiState>>) -> Json<Stats> {
    Json(stats(&s.ports))
}

#[cfg(test)]
mod tests {
    //! The API against a real port manager: real listeners on loopback,
    //! with this process's own namespace as the "child", so a published
    //! 127.0.0.1:P -> Q reaches a server on 127.0.0.1:Q here.

    use super::*;
    use crate::child::netns::ChildDialer;
    use crate::engine::{copy::CopyEngine, Engine};
    use axum::http::{Method, Request};
    use std::net::TcpListener as StdListener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    fn state() -> Arc<ApiState> {
        let dialer: Arc<dyn crate::child::dial::Dial> =
            Arc::new(ChildDialer::new(Path::new("/proc/self/ns/net")).expect("own netns"));
        let engine: Arc<dyn Engine> = Arc::new(CopyEngine);
        Arc::new(ApiState {
            ports: Arc::new(PortManager::new(dialer, engine)),
            state_dir: "/tmp".into(),
            network_driver: None,
            child_pid: None,
        })
    }

    async fn call(
        st: &Arc<ApiState>,
        method: Method,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router(st.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let v = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON body {:?}", String::from_utf8_lossy(&bytes)))
        };
        (status, v)
    }

    /// A port number nobody listens on right now.
    fn free_port() -> u16 {
        StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn msg(v: &serde_json::Value) -> &str {
        v["message"].as_str().unwrap_or_default()
    }

    #[tokio::test]
    async fn add_list_remove_round_trip() {
        let st = state();
        let p = free_port();
        let body =
            format!(r#"{{"proto":"tcp","parentIP":"127.0.0.1","parentPort":{p},"childPort":80}}"#);
        let (s, v) = call(&st, Method::POST, "/v1/ports", &body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["id"], 1);
        assert_eq!(v["spec"]["parentIP"], "127.0.0.1");
        assert!(v["spec"].get("childIP").is_none(), "omitempty: {v}");
        let (s, v) = call(&st, Method::GET, "/v1/ports", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v.as_array().map(Vec::len), Some(1));
        let (s, _) = call(&st, Method::DELETE, "/v1/ports/1", "").await;
        assert_eq!(s, StatusCode::OK);
        // The listener is gone at once.
        assert!(StdListener::bind(("127.0.0.1", p)).is_ok());
        let (s, v) = call(&st, Method::DELETE, "/v1/ports/1", "").await;
        assert_eq!((s, msg(&v)), (StatusCode::BAD_REQUEST, "unknown id: 1"));
        let (s, v) = call(&st, Method::DELETE, "/v1/ports/abc", "").await;
        assert_eq!((s, msg(&v)), (StatusCode::BAD_REQUEST, "bad id abc"));
        // Ids keep increasing.
        let (_, v) = call(&st, Method::POST, "/v1/ports", &body).await;
        assert_eq!(v["id"], 2);
    }

    #[tokio::test]
    async fn bad_requests_get_400_and_a_message() {
        let st = state();
        let p = free_port();
        let big = format!(r#"{{"proto":"tcp","x":"{}"}}"#, "a".repeat(70 * 1024));
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "invalid PortSpec JSON"),
            ("[]".into(), "invalid PortSpec JSON"),
            (
                r#"{"proto":"tcp","parentPort":"80","childPort":80}"#.into(),
                "invalid type",
            ),
            (
                format!(r#"{{"proto":"tcpx","parentPort":{p},"childPort":80}}"#),
                "unknown protocol",
            ),
            (
                format!(r#"{{"proto":"sctp","parentPort":{p},"childPort":80}}"#),
                "not supported yet",
            ),
            (
                r#"{"proto":"tcp","parentPort":0,"childPort":80}"#.into(),
                "parentPort 0 is out of range",
            ),
            (
                r#"{"proto":"tcp","parentPort":65536,"childPort":80}"#.into(),
                "parentPort 65536 is out of range",
            ),
            (
                format!(r#"{{"proto":"tcp","parentPort":{p},"childPort":70000}}"#),
                "childPort 70000",
            ),
            (
                format!(
                    r#"{{"proto":"tcp","parentIP":"300.1.1.1","parentPort":{p},"childPort":80}}"#
                ),
                "not an IP address",
            ),
            (
                format!(r#"{{"proto":"tcp4","parentPort":{p},"childIP":"::1","childPort":80}}"#),
                "does not match protocol tcp4",
            ),
            (
                format!(
                    r#"{{"proto":"tcp","parentIP":"127.0.0.1","parentPort":{p},"childIP":"::1","childPort":80}}"#
                ),
                "family",
            ),
            (big, "larger than 64 KiB"),
        ];
        for (body, want) in &cases {
            let (s, v) = call(&st, Method::POST, "/v1/ports", body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body:.80}: {v}");
            assert!(msg(&v).contains(want), "{body:.80}: {v} (want {want:?})");
        }
        // Nothing was published by any of them.
        assert!(st.ports.list().is_empty());
        assert!(StdListener::bind(("127.0.0.1", p)).is_ok());
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let st = state();
        let (s, v) = call(&st, Method::GET, "/v2/ports", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(msg(&v).contains("/v2/ports"));
        let (s, v) = call(&st, Method::PUT, "/v1/ports", "").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!msg(&v).is_empty());
        let (s, _) = call(&st, Method::POST, "/v1/info", "").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn conflicts() {
        let st = state();
        let p = free_port();
        let add = |ip: &str, proto: &str| {
            let ip = if ip.is_empty() {
                String::new()
            } else {
                format!(r#""parentIP":"{ip}","#)
            };
            format!(r#"{{"proto":"{proto}",{ip}"parentPort":{p},"childPort":80}}"#)
        };
        // (first, second, conflicts?)
        let matrix = [
            (("127.0.0.1", "tcp"), ("127.0.0.1", "tcp"), true),
            (("127.0.0.1", "tcp"), ("127.0.0.2", "tcp"), false),
            (("", "tcp4"), ("127.0.0.2", "tcp"), true),
            (("127.0.0.2", "tcp"), ("", "tcp4"), true),
            (("", "tcp4"), ("::1", "tcp"), false),
            (("::1", "tcp6"), ("", "tcp4"), false),
            (("::1", "tcp6"), ("", "tcp6"), true),
            (("", "tcp"), ("::1", "tcp6"), true),
            (("", "tcp"), ("127.0.0.3", "tcp4"), true),
        ];
        for ((ip1, p1), (ip2, p2), want) in matrix {
            let (s, v) = call(&st, Method::POST, "/v1/ports", &add(ip1, p1)).await;
            assert_eq!(s, StatusCode::CREATED, "{ip1}/{p1}: {v}");
            let id = v["id"].as_u64().unwrap();
            let (s, v2) = call(&st, Method::POST, "/v1/ports", &add(ip2, p2)).await;
            if want {
                assert_eq!(s, StatusCode::BAD_REQUEST, "{ip1}/{p1} vs {ip2}/{p2}");
                assert_eq!(msg(&v2), format!("conflict with ID {id}"));
            } else {
                assert_eq!(s, StatusCode::CREATED, "{ip1}/{p1} vs {ip2}/{p2}: {v2}");
                let id2 = v2["id"].as_u64().unwrap();
                call(&st, Method::DELETE, &format!("/v1/ports/{id2}"), "").await;
            }
            call(&st, Method::DELETE, &format!("/v1/ports/{id}"), "").await;
        }
    }

    #[tokio::test]
    async fn a_failed_listen_leaves_nothing_behind() {
        let st = state();
        // Something else holds the IPv4 port: a tcp (both families)
        // request must fail whole, without keeping its IPv6 half.
        let holder = StdListener::bind("0.0.0.0:0").unwrap();
        let p = holder.local_addr().unwrap().port();
        let body = format!(r#"{{"proto":"tcp","parentPort":{p},"childPort":80}}"#);
        let (s, v) = call(&st, Method::POST, "/v1/ports", &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(msg(&v).contains("Address already in use"), "{v}");
        assert!(st.ports.list().is_empty());
        drop(holder);
        let v6 = std::net::TcpListener::bind(("::", p));
        assert!(v6.is_ok() || !sys::ipv6_available(), "IPv6 half leaked");
    }

    #[test]
    fn privileged_port_error_names_the_sysctl() {
        let e = PortError::listen(
            "0.0.0.0:80".parse().unwrap(),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(
            e.to_string()
                .contains("net.ipv4.ip_unprivileged_port_start"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn info_and_stats() {
        let st = state();
        let (s, v) = call(&st, Method::GET, "/v1/info", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["apiVersion"], "1.1.1");
        assert_eq!(v["portDriver"]["driver"], "forwarder");
        assert_eq!(v["portDriver"]["disallowLoopbackChildIP"], false);
        let protos: Vec<&str> = v["portDriver"]["protos"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        assert!(protos.contains(&"tcp") && protos.contains(&"tcp4"));
        assert_eq!(protos.contains(&"tcp6"), sys::ipv6_available());
        let (s, v) = call(&st, Method::GET, "/v1/stats", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["engine"], "copy");
        assert_eq!(v["total"]["connections"], 0);
        let p = free_port();
        let body =
            format!(r#"{{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":{p},"childPort":80}}"#);
        let (s, _) = call(&st, Method::POST, "/v1/ports", &body).await;
        assert_eq!(s, StatusCode::CREATED);
        let (_, v) = call(&st, Method::GET, "/v1/stats", "").await;
        let port = &v["ports"][0];
        assert_eq!(port["engine"], "copy", "{v}");
        for key in [
            "active",
            "connections",
            "dial_failures",
            "bytes_to_child",
            "bytes_to_parent",
        ] {
            assert_eq!(port[key], 0, "{key} in {v}");
        }
    }

    /// Counts this process's open descriptors.
    fn fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_thousand_ports_added_and_removed_leak_nothing() {
        let st = state();
        // Warm up lazily created descriptors (runtime, dialer thread).
        let (_, v) = call(
            &st,
            Method::POST,
            "/v1/ports",
            r#"{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":1,"childPort":1}"#,
        )
        .await;
        if let Some(id) = v["id"].as_u64() {
            call(&st, Method::DELETE, &format!("/v1/ports/{id}"), "").await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Other tests run in parallel threads of this process and open and
        // close descriptors too: the count is only a coarse bound, the
        // exact check is that every removed port can be bound again, which
        // a leaked listener would prevent.
        let before = fds();
        let mut added = Vec::new();
        for _ in 0..1000 {
            let p = free_port();
            let body = format!(
                r#"{{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":{p},"childPort":80}}"#
            );
            let (s, v) = call(&st, Method::POST, "/v1/ports", &body).await;
            if s == StatusCode::CREATED {
                added.push((v["id"].as_u64().unwrap(), p));
            }
        }
        assert!(added.len() > 950, "only {} ports added", added.len());
        for (_, p) in &added {
            assert!(
                StdListener::bind(("127.0.0.1", *p)).is_err(),
                "port {p} not listening"
            );
        }
        for (id, _) in &added {
            let (s, _) = call(&st, Method::DELETE, &format!("/v1/ports/{id}"), "").await;
            assert_eq!(s, StatusCode::OK);
        }
        for (_, p) in &added {
            assert!(
                StdListener::bind(("127.0.0.1", *p)).is_ok(),
                "listener on {p} leaked"
            );
        }
        let now = fds();
        assert!(
            now < before + 100,
            "{} more descriptors than before 1000 ports came and went",
            now.saturating_sub(before)
        );
        assert!(st.ports.list().is_empty());
    }

    #[tokio::test]
    async fn removing_a_port_keeps_established_connections() {
        let st = state();
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sp = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = free_port();
        let body = format!(
            r#"{{"proto":"tcp4","parentIP":"127.0.0.1","parentPort":{p},"childPort":{sp}}}"#
        );
        let (s, v) = call(&st, Method::POST, "/v1/ports", &body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        c.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"before");
        let (s, _) = call(&st, Method::DELETE, "/v1/ports/1", "").await;
        assert_eq!(s, StatusCode::OK);
        // New connections are refused, the established one keeps flowing.
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .is_err());
        c.write_all(b"after!").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after!");
    }

    #[tokio::test]
    async fn socket_is_private_and_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(ApiSocketError::InUse(_))));
        drop(l);
        // Stale now: replaced.
        assert!(bind(&path).is_ok());
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(ApiSocketError::NotASocket(_))));
    }

    /// Runs rootlessctl (Debian's `rootlesskit` package, installed by
    /// `cargo xtask setup`) against a served API socket.
    async fn rootlessctl(sock: &Path, args: &[&str]) -> (bool, String) {
        let sock = sock.to_owned();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("rootlessctl")
                .arg("--socket")
                .arg(&sock)
                .args(&args)
                .output()
                .expect(
                    "rootlessctl not found: run `cargo xtask setup` (Debian package rootlesskit)",
                );
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn rootlessctl_drives_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let st = state();
        let listener = UnixListener::from_std(bind(&sock).unwrap()).unwrap();
        tokio::spawn(serve(listener, st.clone(), std::future::pending()));

        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sp = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                let _ = s.write_all(b"hello from the child\n").await;
            }
        });
        let p = free_port();
        let (ok, out) =
            rootlessctl(&sock, &["add-ports", &format!("127.0.0.1:{p}:{sp}/tcp")]).await;
        assert!(ok, "add-ports: {out}");
        assert_eq!(out.trim(), "1");
        let (ok, out) = rootlessctl(&sock, &["list-ports"]).await;
        assert!(
            ok && out.contains(&p.to_string()) && out.contains("127.0.0.1"),
            "{out}"
        );
        let (ok, out) = rootlessctl(&sock, &["list-ports", "--json"]).await;
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(v["id"], 1);
        assert_eq!(v["spec"]["parentPort"], p);
        let (ok, out) = rootlessctl(&sock, &["info"]).await;
        assert!(
            ok && out.contains("1.1.1") && out.contains("forwarder"),
            "{out}"
        );

        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap_or_default();
        assert!(got.starts_with("hello from the child"), "{got:?}");

        let (ok, out) =
            rootlessctl(&sock, &["add-ports", &format!("127.0.0.1:{p}:{sp}/tcp")]).await;
        assert!(!ok && out.contains("conflict with ID 1"), "{out}");
        let (ok, out) = rootlessctl(&sock, &["remove-ports", "1"]).await;
        assert!(ok, "{out}");
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .is_err());
        let (ok, out) = rootlessctl(&sock, &["remove-ports", "1"]).await;
        assert!(!ok && out.contains("unknown id: 1"), "{out}");
    }
}
