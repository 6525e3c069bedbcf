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
//! This module is pure: [`plan`] maps (spec, listener family) to a
//! [`DialPlan`] and the dialer ([`crate::netns`]) executes it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::spec::PortSpec;

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
}
