//! The child side: dialing inside the container's network namespace and
//! getting the addresses right.
//!
//! - [`dial`]: the dial rules as pure functions (ParentIP, CHILDIP, IPv6 ->
//!   IPv4) and the [`dial::Dial`] trait every dialer implements.
//! - [`netns`]: the in-process dialer, a thread that entered the child's
//!   namespace.
//! - [`srcip`]: source preservation, so the container sees the client's
//!   own address (transparent sockets and their return routes).
//! - [`agent`]: the dial agent, for forwarders that may not enter the
//!   child's namespace: a process inside it that runs the same dialer and
//!   passes each socket back.
//! - [`setup`]: what the agent does before serving: the source-address
//!   probe, its routes, and dropping capabilities.
//!
//! May use: `wire`, `sys`. Nothing here knows about engines, ports or the
//! API.

pub(crate) mod agent;
pub(crate) mod dial;
pub(crate) mod netns;
pub mod setup;
pub(crate) mod srcip;
