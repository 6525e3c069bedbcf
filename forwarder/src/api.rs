//! RootlessKit's v1 port API over a Unix socket, so rootlessctl, dockerd
//! and nerdctl can drive the forwarder unchanged, plus `GET /v1/stats`.
//!
//! | method, path          | success                | errors                         |
//! |-----------------------|------------------------|--------------------------------|
//! | GET /v1/ports         | 200, [PortStatus]      |                                |
//! | POST /v1/ports        | 201, PortStatus        | 400 {"message"}                |
//! | DELETE /v1/ports/{id} | 200                    | 400 "bad id", "unknown id: N"  |
//! | GET /v1/info          | 200, Info              |                                |
//! | GET /v1/stats         | 200, Stats (ours)      |                                |
//!
//! Unknown paths answer 404 and unknown methods 405, both with a JSON
//! `{"message"}` body like every other error.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::UnixListener;

use crate::engine::MapEntries;
use crate::port::{PortError, PortManager, PortReport};
use crate::spec::{ApiSpec, PortSpec};
use crate::stats::Snapshot;
use crate::sys;

/// The RootlessKit API version this implements.
pub const API_VERSION: &str = "1.1.1";

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

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
pub fn bind(path: &Path) -> Result<UnixListener, ApiSocketError> {
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
        UnixListener::bind(path).map_err(io_err)?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// What the handlers share.
pub struct ApiState {
    pub ports: Arc<PortManager>,
    pub state_dir: String,
    pub child_pid: Option<u32>,
}

/// An error reply: a status and `{"message": ...}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "message": self.1 }))).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// RootlessKit's `port.Status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PortStatusJson {
    pub id: u32,
    pub spec: ApiSpec,
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

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    state: Arc<ApiState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed on {}", uri.path()),
    )
}

async fn get_ports(State(s): State<Arc<ApiState>>) -> Json<Vec<PortStatusJson>> {
    Json(
        s.ports
            .list()
            .into_iter()
            .map(|p| PortStatusJson { id: p.id, spec: p.api })
            .collect(),
    )
}

async fn post_port(State(s): State<Arc<ApiState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| bad_request(format!("request body is larger than {} KiB", MAX_BODY / 1024)))?;
    let api: ApiSpec = serde_json::from_slice(&bytes)
        .map_err(|e| bad_request(format!("invalid PortSpec JSON: {e}")))?;
    let spec = PortSpec::try_from(&api).map_err(bad_request)?;
    let st = s.ports.add(spec, api).map_err(|e| match e {
        PortError::Conflict(_)
        | PortError::UnknownId(_)
        | PortError::Listen { .. }
        | PortError::NoIpv6 { .. } => bad_request(e.to_string()),
    })?;
    Ok((
        StatusCode::CREATED,
        Json(PortStatusJson {
            id: st.id,
            spec: st.api,
        }),
    )
        .into_response())
}

async fn delete_port(
    State(s): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let id: u32 = id.parse().map_err(|_| bad_request(format!("bad id {id}")))?;
    s.ports
        .remove(id)
        .map(|()| StatusCode::OK)
        .map_err(|e| bad_request(e.to_string()))
}

/// The protocols this forwarder can serve right now: without IPv6 in the
/// parent namespace, no tcp6 (dockerd then skips those mappings itself).
pub fn protos() -> Vec<&'static str> {
    if sys::ipv6_available() {
        vec!["tcp", "tcp4", "tcp6"]
    } else {
        vec!["tcp", "tcp4"]
    }
}

async fn get_info(State(s): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    let mut info = json!({
        "apiVersion": API_VERSION,
        "version": env!("CARGO_PKG_VERSION"),
        "stateDir": s.state_dir,
        "portDriver": {
            "driver": "forwarder",
            "protos": protos(),
            "disallowLoopbackChildIP": false,
        },
    });
    if let (Some(pid), Some(obj)) = (s.child_pid, info.as_object_mut()) {
        obj.insert("childPID".into(), json!(pid));
    }
    Json(info)
}

/// `GET /v1/stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsJson {
    pub engine: String,
    pub total: Snapshot,
    pub ports: Vec<PortReport>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bpf_map_entries: Option<MapEntries>,
}

/// The statistics of a port manager, as the API and the stdout channel
/// report them.
pub fn stats(ports: &PortManager) -> StatsJson {
    let (per_port, total) = ports.stats();
    StatsJson {
        engine: ports.engine().kind().to_string(),
        total,
        ports: per_port,
        bpf_map_entries: ports.engine().map_entries(),
    }
}

async fn get_stats(State(s): State<Arc<ApiState>>) -> Json<StatsJson> {
    Json(stats(&s.ports))
}
