//! The wire formats, typed once: every message the forwarder exchanges
//! with the world, shared by the side that writes it and the side that
//! reads it.
//!
//! - **The port API** (RootlessKit's v1 over a Unix socket, plus
//!   `/v1/stats`): served by `api`, read by `client` (`forwarder ports`,
//!   `forwarder status`), by rootlessctl and dockerd, by the tests and by
//!   xtask. Field names follow RootlessKit's JSON (`apiVersion`,
//!   `childPID`, `parentIP`, …).
//! - **Events**: one JSON object a line on the forwarder's stdout (logs go
//!   to stderr), tagged by `"event"`: [`Event::Ready`] once every listener
//!   is up, [`Event::Stats`] on SIGUSR1 and once more at exit.
//! - **The agent's messages**: one JSON object per SOCK_SEQPACKET packet
//!   between the forwarder and its child-side dial agent; a reply that
//!   succeeded carries the dialed socket as SCM_RIGHTS ancillary data.
//!
//! Only data lives here: no I/O, no decisions, and no other module of the
//! crate is used, so a change elsewhere cannot change a message by
//! accident. The port specs' two forms (the `-p` text and the API's JSON)
//! are in [`spec`], the counters' snapshots in [`counters`].
//!
//! May use: nothing.

pub mod counters;
pub mod spec;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use counters::{
    ByPath, Drops, EngineKind, LocalPath, MapEntries, Pooled, Snapshot, UdpSnapshot,
};
pub use spec::ApiSpec;

/// The API version `/v1/info` reports (RootlessKit's).
pub const API_VERSION: &str = "1.1.1";

/// The body of every error reply: `{"message": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

/// RootlessKit's `port.Status`: an element of `GET /v1/ports`, and the
/// reply to `POST /v1/ports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortStatus {
    pub id: u32,
    pub spec: ApiSpec,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub version: String,
    #[serde(rename = "stateDir")]
    pub state_dir: String,
    #[serde(rename = "childPID", default, skip_serializing_if = "Option::is_none")]
    pub child_pid: Option<u32>,
    /// RootlessKit's network driver section, passed on unchanged when the
    /// forwarder took over a RootlessKit instance's API.
    #[serde(
        rename = "networkDriver",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub network_driver: Option<serde_json::Value>,
    #[serde(rename = "portDriver")]
    pub port_driver: PortDriverInfo,
}

/// The `portDriver` section of [`Info`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortDriverInfo {
    pub driver: String,
    /// The protocols that can be published now (no tcp6 or udp6 without
    /// IPv6 in the parent namespace).
    pub protos: Vec<String>,
    #[serde(rename = "disallowLoopbackChildIP")]
    pub disallow_loopback_child_ip: bool,
    /// The container sees clients' own addresses (source preservation on;
    /// a forwarder extension, absent in RootlessKit's).
    #[serde(rename = "sourceIP", default)]
    pub source_ip: bool,
}

/// Statistics of one port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortReport {
    pub id: u32,
    pub spec: String,
    /// The engine carrying the port's connections.
    pub engine: String,
    #[serde(flatten)]
    pub stats: Snapshot,
    /// Datagrams, flows and drops of a UDP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSnapshot>,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub engine: String,
    /// Every port ever published, removed ones included.
    pub total: Snapshot,
    /// The live ports.
    pub ports: Vec<PortReport>,
    #[serde(flatten)]
    pub shared: SharedCounters,
}

/// The counters of [`Stats`] and [`StatsEvent`] that belong to no port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedCounters {
    /// Entries in the ebpf engine's maps (ebpf only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bpf_map_entries: Option<MapEntries>,
    /// The local-client path's counters (ebpf with the path on).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub local_path: Option<LocalPath>,
    /// Idle pipes and buffers kept for reuse by the splice and copy paths.
    #[serde(default)]
    pub pooled: Pooled,
    /// UDP counters over every UDP port ever published.
    #[serde(default)]
    pub udp: UdpSnapshot,
}

/// A line of the forwarder's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// Every listener of the command line is up (and the API socket, if
    /// any): clients may connect.
    Ready(Ready),
    /// The counters: on SIGUSR1, and once at exit after teardown.
    Stats(Box<StatsEvent>),
}

/// The contents of [`Event::Ready`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub engine: EngineKind,
    /// The ebpf engine's program layout (`verdict` or `parser+verdict`);
    /// `null` for the other engines.
    pub variant: Option<String>,
    /// Why this engine (auto mode's reason, or the mode asked for).
    pub reason: String,
    /// Every address listened on.
    pub listeners: Vec<SocketAddr>,
}

/// The contents of [`Event::Stats`]: [`Stats`] with the totals at top
/// level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsEvent {
    pub engine: String,
    #[serde(flatten)]
    pub total: Snapshot,
    pub ports: Vec<PortReport>,
    #[serde(flatten)]
    pub shared: SharedCounters,
}

impl From<Stats> for StatsEvent {
    fn from(s: Stats) -> Self {
        StatsEvent {
            engine: s.engine,
            total: s.total,
            ports: s.ports,
            shared: s.shared,
        }
    }
}

/// The largest agent message either way, in bytes.
pub const AGENT_MAX_MESSAGE: usize = 4096;

/// The `message` of the agent's greeting, the reply with id 0 it sends
/// first on every connection once it holds no capability and is ready to
/// dial.
pub const AGENT_HELLO: &str = "agent ready";

/// The forwarder asks the agent to dial for a connection or flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRequest {
    /// Chosen by the forwarder, echoed in the reply (non-zero: 0 is the
    /// agent's greeting).
    pub id: u64,
    /// The published port the connection or flow arrived on.
    pub spec: ApiSpec,
    /// It arrived on an IPv6 socket.
    pub ipv6_listener: bool,
    /// The client's address and port, to bind as the source where source
    /// preservation is on and applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A port to bind the dialed TCP socket to before it connects
    /// ([`crate::child::dial::DialRequest::bind_port`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_port: Option<u16>,
}

/// The forwarder asks the agent for fresh TCP (or, with `udp`, UDP)
/// sockets of the child's namespace, made ahead of the dials that will use
/// them (connections and flows whose source is not preserved: the
/// forwarder binds and connects them itself). The reply ([`AgentReply`]
/// with this id, `ok`) carries up to `sockets` of them
/// ([`AGENT_MAX_SOCKETS`] at most). An agent of a release without `udp`
/// sends TCP sockets, which the forwarder closes.
///
/// With `transparent` (TCP only), the sockets are ready for a preserved
/// source: IP_TRANSPARENT, SO_REUSEADDR and the return mark set, which
/// needs the agent's capabilities, so that the forwarder only binds the
/// client's address and connects. The reply also carries the child's
/// addresses ([`AgentReply::addresses`]), which decide whether a source is
/// preserved. An agent without source preservation refuses (`ok` false).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSockets {
    pub id: u64,
    pub sockets: u8,
    pub ipv6: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub udp: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
}

/// The most sockets one [`AgentSockets`] reply carries (what the
/// forwarder's receive makes room for).
pub const AGENT_MAX_SOCKETS: u8 = 32;

/// The forwarder tells the agent that a UDP flow's socket was closed:
/// `[reached, local]` as the dial reported and the socket's own address.
/// The agent removes the flow's return rule; no reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentFlowClosed {
    pub udp_closed: [String; 2],
}

/// The agent's answer to an [`AgentRequest`] (or, with id 0, its greeting).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReply {
    pub id: u64,
    /// The dial succeeded and the socket is attached.
    pub ok: bool,
    /// The address the dial reached (after any IPv4 fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// In the greeting: whether source preservation is on in the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    /// In the reply to an [`AgentSockets`] request with `transparent`: the
    /// child's own addresses as the agent last read them (at most half a
    /// second before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<std::net::IpAddr>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stdout lines keep their documented shape: tagged by "event",
    /// the stats totals at top level, and they read back as written.
    #[test]
    fn events_round_trip_in_their_documented_shape() {
        let ready = Event::Ready(Ready {
            engine: EngineKind::Splice,
            variant: None,
            reason: "asked for".into(),
            listeners: vec!["127.0.0.1:8080".parse().unwrap()],
        });
        let line = serde_json::to_string(&ready).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "ready");
        assert_eq!(v["engine"], "splice");
        assert_eq!(v["listeners"][0], "127.0.0.1:8080");
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), ready);

        let stats = Event::Stats(Box::new(StatsEvent {
            engine: "copy".into(),
            total: Snapshot {
                active: 1,
                connections: 2,
                ..Default::default()
            },
            ports: vec![],
            shared: SharedCounters::default(),
        }));
        let line = serde_json::to_string(&stats).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "stats");
        assert_eq!(v["active"], 1);
        assert_eq!(v["connections"], 2);
        assert!(v.get("bpf_map_entries").is_none(), "{v}");
        // The counters shared by both shapes sit at top level too.
        assert!(
            v["pooled"].is_object() && v["udp"]["drops"].is_object(),
            "{v}"
        );
        let api = serde_json::to_value(Stats {
            engine: "copy".into(),
            total: Snapshot::default(),
            ports: vec![],
            shared: SharedCounters::default(),
        })
        .unwrap();
        assert!(
            api["total"].is_object() && api["pooled"].is_object(),
            "{api}"
        );
        assert!(
            api["udp"]["drops"].is_object() && api.get("shared").is_none(),
            "{api}"
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), stats);
    }

    /// RootlessKit's field names, as rootlessctl and dockerd read them.
    #[test]
    fn info_uses_rootlesskit_names() {
        let info = Info {
            api_version: API_VERSION.into(),
            version: "0".into(),
            state_dir: "/run/x".into(),
            child_pid: Some(42),
            network_driver: None,
            port_driver: PortDriverInfo {
                driver: "forwarder".into(),
                protos: vec!["tcp".into()],
                disallow_loopback_child_ip: false,
                source_ip: true,
            },
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["childPID"], 42);
        assert_eq!(v["portDriver"]["disallowLoopbackChildIP"], false);
        assert!(v.get("networkDriver").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<Info>(v).unwrap(), info);
    }
}
