//! The child-side dial rule: which address a connection accepted in the
//! parent namespace is dialed at inside the child namespace.
//!
//! The first rule that applies wins:
//! 1. the spec names a child IP: dial it;
//! 2. the spec's parent IP is a loopback address (127.0.0.0/8 or ::1): dial
//!    that same address, so 127.0.0.2:8080 reaches 127.0.0.2 in the child
//!    (RootlessKit's ParentIP rule, nerdctl #3539);
//! 3. otherwise (unspecified or any other address): 127.0.0.1 for an IPv4
//!    listener, ::1 for an IPv6 one;
//! 4. an IPv6 dial that fails because the child has no usable IPv6 is
//!    retried once at 127.0.0.1 (see [`should_fall_back`]).
//!
//! The decisions are pure: [`plan`] maps (spec, listener family) to a
//! [`DialPlan`], and [`execute`] runs a plan with any connect function.
//! Who connects is behind the [`Dial`] trait: the thread inside the child's
//! namespace (`netns::ChildDialer`) or the child-side agent's client
//! (`agent::AgentClient`). The port manager and the UDP relays hold an
//! `Arc<dyn Dial>`, so they never know which, and tests can give them a
//! fake. This module sits below all of them and depends on none.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;

use tokio::net::TcpStream;

use crate::wire::spec::PortSpec;

/// Where to dial in the child, and where to retry if IPv6 is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialPlan {
    pub target: SocketAddr,
    /// Set when `target` is IPv6 and the IPv4 fallback (rule 4) applies.
    pub fallback: Option<SocketAddr>,
}

/// Applies rules 1-3 to a connection accepted by a listener of `spec`
/// (`ipv6_listener`: the listener is an IPv6 socket) and says whether rule
/// 4 may apply.
pub fn plan(spec: &PortSpec, ipv6_listener: bool) -> DialPlan {
    let port = spec.child_port;
    let ip = match (spec.child_ip, spec.parent_ip) {
        (Some(ip), _) => ip,
        (None, Some(pip)) if pip.is_loopback() => pip,
        (None, _) if ipv6_listener => Ipv6Addr::LOCALHOST.into(),
        (None, _) => Ipv4Addr::LOCALHOST.into(),
    };
    let target = SocketAddr::new(ip, port);
    // Rule 4 applies to IPv6 targets the rule chose itself and to an
    // explicit ::1; an explicit non-loopback IPv6 child IP is honoured as is.
    let fallback = match ip {
        IpAddr::V6(v6) if spec.child_ip.is_none() || v6.is_loopback() => {
            Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
        }
        _ => None,
    };
    DialPlan { target, fallback }
}

/// Whether an IPv6 dial error means "the child has no usable IPv6", so the
/// dial should be retried over IPv4 (rule 4). A refusal on ::1 counts:
/// servers that listen on 0.0.0.0 only refuse ::1 while IPv4 answers.
pub fn should_fall_back(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EADDRNOTAVAIL)
            | Some(libc::ENETUNREACH)
            | Some(libc::EAFNOSUPPORT)
            | Some(libc::EHOSTUNREACH)
            | Some(libc::ECONNREFUSED)
    )
}

/// A dial that failed: the errno of the last attempt and a message naming
/// the addresses tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DialFailure {
    pub errno: Option<i32>,
    pub message: String,
}

impl DialFailure {
    /// A failure with an errno of our own choosing (e.g. ETIMEDOUT).
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        DialFailure {
            errno: Some(errno),
            message: message.into(),
        }
    }
}

/// What one dial is for: a connection or flow received by a socket of
/// `spec`, IPv6 or not. Everything a dialer needs goes here, so a new input
/// (a source address to bind, say) is a new field, not a new method.
#[derive(Debug, Clone, Copy)]
pub struct DialRequest<'a> {
    pub spec: &'a PortSpec,
    /// The parent socket that received it is an IPv6 socket.
    pub ipv6_listener: bool,
    /// The client's address and port, to bind as the dialed socket's source
    /// where source preservation is on and applies ([`crate::child::srcip`]).
    pub source: Option<SocketAddr>,
    /// A port to bind the dialed TCP socket to before it connects (on the
    /// client's address where source preservation applies, else on the
    /// unspecified address), so the forwarder knows the dialed socket's
    /// port before the container's server accepts it (the local-client
    /// path registers it, see `engine::local`). Where the port cannot be
    /// bound the dial goes on from an ephemeral port.
    pub bind_port: Option<u16>,
}

impl DialRequest<'_> {
    /// Rules 1-4 for this request.
    pub fn plan(&self) -> DialPlan {
        plan(self.spec, self.ipv6_listener)
    }
}

/// What a [`Dial`] method returns: the socket and the address it reached.
pub type DialFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<(T, SocketAddr), DialFailure>> + Send + 'a>>;

/// Creates sockets in the child namespace and connects them by the rules
/// above.
pub trait Dial: Send + Sync {
    /// A TCP stream for a connection accepted by a listener of the request's
    /// spec.
    fn tcp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, TcpStream>;

    /// A connected UDP socket for a flow received by a socket of the
    /// request's (udp, udp4 or udp6) spec.
    fn udp<'a>(&'a self, req: DialRequest<'a>) -> DialFuture<'a, OwnedFd>;

    /// A UDP flow's socket, dialed by [`Dial::udp`], reaching `reached`
    /// from `local` (its own address), was closed: undo what the dial set
    /// up for it (the return rule of a flow with the client's address).
    fn udp_closed(&self, reached: SocketAddr, local: SocketAddr) {
        let _ = (reached, local);
    }

    /// The cookie of the child namespace (`SO_NETNS_COOKIE`), once a
    /// socket made there is known.
    fn netns_cookie(&self) -> Option<u64> {
        None
    }

    /// Whether dials made now bind the client's address as their source
    /// (source preservation is on and working, [`crate::child::srcip`]).
    fn preserves_source(&self) -> bool {
        false
    }
}

/// Executes `plan` with `connect`: the target, then the IPv4 fallback when
/// the target failed for lack of IPv6 (rule 4). Returns what `connect` made
/// and the address it reached.
pub async fn execute<T, F, Fut>(plan: DialPlan, connect: F) -> Result<(T, SocketAddr), DialFailure>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let e = match connect(plan.target).await {
        Ok(s) => return Ok((s, plan.target)),
        Err(e) => e,
    };
    match plan.fallback {
        Some(fb) if should_fall_back(&e) => {
            tracing::debug!(target = %plan.target, error = %e, fallback = %fb,
                "IPv6 dial failed, retrying over IPv4");
            match connect(fb).await {
                Ok(s) => Ok((s, fb)),
                Err(e2) => Err(DialFailure {
                    errno: e2.raw_os_error(),
                    message: format!("{}: {e}; IPv4 fallback {fb}: {e2}", plan.target),
                }),
            }
        }
        _ => Err(DialFailure {
            errno: e.raw_os_error(),
            message: format!("{}: {e}", plan.target),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        // (spec, IPv6 listener?, expected target, expected fallback)
        let cases: &[(&str, bool, &str, Option<&str>)] = &[
            // rule 1: explicit child IP wins
            ("127.0.0.2:8080:10.0.0.5:80", false, "10.0.0.5:80", None),
            ("10.1.1.1:8080:10.0.0.5:80", false, "10.0.0.5:80", None),
            (
                "[::1]:8080:[::1]:80",
                true,
                "[::1]:80",
                Some("127.0.0.1:80"),
            ),
            ("[::1]:8080:[fd00::5]:80", true, "[fd00::5]:80", None),
            // rule 2: a loopback parent IP is dialed as is
            ("127.0.0.2:8080:80", false, "127.0.0.2:80", None),
            ("127.0.0.1:8080:80", false, "127.0.0.1:80", None),
            ("127.255.0.9:8080:80/tcp4", false, "127.255.0.9:80", None),
            ("[::1]:8080:80", true, "[::1]:80", Some("127.0.0.1:80")),
            // rule 3: unspecified or any other address: the child's loopback
            ("8080:80", false, "127.0.0.1:80", None),
            ("8080:80", true, "[::1]:80", Some("127.0.0.1:80")),
            ("0.0.0.0:8080:80", false, "127.0.0.1:80", None),
            ("[::]:8080:80", true, "[::1]:80", Some("127.0.0.1:80")),
            ("192.168.1.10:8080:80", false, "127.0.0.1:80", None),
            ("[fd00::1]:8080:80", true, "[::1]:80", Some("127.0.0.1:80")),
        ];
        for (spec, v6, target, fallback) in cases {
            let spec: PortSpec = spec.parse().unwrap();
            let p = plan(&spec, *v6);
            assert_eq!(
                p.target,
                target.parse().unwrap(),
                "{spec} (v6 listener {v6})"
            );
            assert_eq!(
                p.fallback,
                fallback.map(|f| f.parse().unwrap()),
                "{spec} (v6 listener {v6})"
            );
        }
    }

    #[test]
    fn fallback_errors() {
        for e in [
            libc::EADDRNOTAVAIL,
            libc::ENETUNREACH,
            libc::EAFNOSUPPORT,
            libc::ECONNREFUSED,
        ] {
            assert!(should_fall_back(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [libc::ETIMEDOUT, libc::EMFILE, libc::EPERM] {
            assert!(!should_fall_back(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }

    /// [`execute`] against a fake connect: which addresses it tries, in
    /// which order, and what it reports.
    #[tokio::test]
    async fn execute_table() {
        use std::sync::Mutex;
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        // (fallback?, errno of the v6 attempt or 0, errno of the v4 attempt
        //  or 0, addresses tried, Ok(reached) or Err(errno))
        type Case<'a> = (bool, i32, i32, &'a [SocketAddr], Result<SocketAddr, i32>);
        let cases: &[Case] = &[
            (true, 0, 0, &[v6], Ok(v6)),
            (true, libc::EADDRNOTAVAIL, 0, &[v6, v4], Ok(v4)),
            (true, libc::ECONNREFUSED, 0, &[v6, v4], Ok(v4)),
            (
                true,
                libc::ENETUNREACH,
                libc::ECONNREFUSED,
                &[v6, v4],
                Err(libc::ECONNREFUSED),
            ),
            // Not a lack of IPv6: no retry, the first error stands.
            (true, libc::ETIMEDOUT, 0, &[v6], Err(libc::ETIMEDOUT)),
            // No fallback in the plan.
            (
                false,
                libc::EADDRNOTAVAIL,
                0,
                &[v6],
                Err(libc::EADDRNOTAVAIL),
            ),
        ];
        for (fallback, e6, e4, tried, want) in cases {
            let plan = DialPlan {
                target: v6,
                fallback: fallback.then_some(v4),
            };
            let seen = Mutex::new(Vec::new());
            let got = execute(plan, |a| {
                seen.lock().unwrap().push(a);
                let errno = if a.is_ipv6() { *e6 } else { *e4 };
                async move {
                    if errno == 0 {
                        Ok(a)
                    } else {
                        Err(io::Error::from_raw_os_error(errno))
                    }
                }
            })
            .await;
            assert_eq!(&seen.lock().unwrap()[..], *tried, "{e6} {e4}");
            match (got, want) {
                (Ok((made, reached)), Ok(w)) => {
                    assert_eq!((made, reached), (*w, *w));
                }
                (Err(f), Err(w)) => {
                    assert_eq!(f.errno, Some(*w), "{f}");
                    assert!(f.message.contains(&v6.to_string()), "{f}");
                }
                (got, want) => panic!("{e6} {e4}: got {got:?}, want {want:?}"),
            }
        }
    }
}
