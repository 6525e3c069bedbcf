//! Port specifications: what to listen on in the parent namespace and what
//! to reach in the child.
//!
//! The command line takes docker/rootlessctl style strings
//! (`[PARENTIP:]PARENTPORT:[CHILDIP:]CHILDPORT[/PROTO]`); the API takes
//! RootlessKit's JSON `PortSpec`. Both end up as a validated [`PortSpec`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a port specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid port spec {spec:?}: {why}")]
    Invalid { spec: String, why: String },
}

fn invalid(spec: &str, why: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        spec: spec.to_string(),
        why: why.into(),
    }
}

/// Transport protocol and address family of a published port.
///
/// `tcp` and `udp` mean "whatever the parent IP's family is", and for an
/// unspecified parent IP both families (the IPv6 half may be discarded when
/// the parent has no IPv6, see docs/rules.md, IPv6 rules for publishing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Tcp4,
    Tcp6,
    Udp,
    Udp4,
    Udp6,
}

/// Which address families a protocol admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

impl Proto {
    /// The protocol name as RootlessKit spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Tcp4 => "tcp4",
            Proto::Tcp6 => "tcp6",
            Proto::Udp => "udp",
            Proto::Udp4 => "udp4",
            Proto::Udp6 => "udp6",
        }
    }

    /// Whether this is one of the UDP protocols.
    pub fn is_udp(self) -> bool {
        matches!(self, Proto::Udp | Proto::Udp4 | Proto::Udp6)
    }

    /// The families the protocol admits.
    pub fn family(self) -> Family {
        match self {
            Proto::Tcp | Proto::Udp => Family::Any,
            Proto::Tcp4 | Proto::Udp4 => Family::V4,
            Proto::Tcp6 | Proto::Udp6 => Family::V6,
        }
    }

    /// The same transport limited to one family.
    fn with_family(self, ipv4: bool) -> Proto {
        match (self.is_udp(), ipv4) {
            (false, true) => Proto::Tcp4,
            (false, false) => Proto::Tcp6,
            (true, true) => Proto::Udp4,
            (true, false) => Proto::Udp6,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "tcp4" => Ok(Proto::Tcp4),
            "tcp6" => Ok(Proto::Tcp6),
            "udp" => Ok(Proto::Udp),
            "udp4" => Ok(Proto::Udp4),
            "udp6" => Ok(Proto::Udp6),
            "sctp" | "sctp4" | "sctp6" => Err(format!(
                "protocol {s:?} is not supported yet (only tcp, tcp4, tcp6, udp, udp4, udp6)"
            )),
            other => Err(format!(
                "unknown protocol {other:?} (expected tcp, tcp4, tcp6, udp, udp4 or udp6)"
            )),
        }
    }
}

/// A validated port mapping.
///
/// `parent_ip == None` means every address of the family (or both families
/// for [`Proto::Tcp`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub proto: Proto,
    pub parent_ip: Option<IpAddr>,
    pub parent_port: u16,
    pub child_ip: Option<IpAddr>,
    pub child_port: u16,
}

impl PortSpec {
    /// Checks the cross-field rules shared by the CLI and the API.
    pub fn validate(self, spec: &str) -> Result<Self, SpecError> {
        if self.parent_port == 0 {
            return Err(invalid(spec, "parent port must be between 1 and 65535"));
        }
        if self.child_port == 0 {
            return Err(invalid(spec, "child port must be between 1 and 65535"));
        }
        let fam_ok = |ip: &IpAddr| match self.proto.family() {
            Family::Any => true,
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        };
        if let Some(ip) = &self.parent_ip {
            if !fam_ok(ip) {
                return Err(invalid(
                    spec,
                    format!("parent IP {ip} does not match protocol {}", self.proto),
                ));
            }
            if ip.is_multicast() {
                return Err(invalid(
                    spec,
                    format!("parent IP {ip} is a multicast address"),
                ));
            }
        }
        if let Some(ip) = &self.child_ip {
            if !fam_ok(ip) {
                return Err(invalid(
                    spec,
                    format!("child IP {ip} does not match protocol {}", self.proto),
                ));
            }
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(
                    spec,
                    format!("child IP {ip} cannot be dialed (unspecified or multicast)"),
                ));
            }
            // An unspecified parent IP fixes the family too: 0.0.0.0 means
            // tcp4 and :: tcp6 (see below), whose child IP must match.
            if let Some(pip) = &self.parent_ip {
                if pip.is_ipv4() != ip.is_ipv4() {
                    return Err(invalid(
                        spec,
                        format!("child IP {ip} is not of the parent IP {pip}'s family"),
                    ));
                }
            }
        }
        // Normalise an explicit unspecified parent IP to "all addresses" of
        // its family: 0.0.0.0 is tcp4-all (udp4-all), :: is tcp6-all.
        let mut s = self;
        if let Some(ip) = s.parent_ip {
            if ip.is_unspecified() {
                s.parent_ip = None;
                if s.proto.family() == Family::Any {
                    s.proto = s.proto.with_family(ip.is_ipv4());
                }
            }
        }
        Ok(s)
    }

    /// The addresses to listen on in the parent namespace. The second item
    /// says whether failing to listen on that address may be tolerated (the
    /// IPv6 half of an unspecified `tcp` request).
    pub fn listen_addrs(&self) -> Vec<(SocketAddr, bool)> {
        let p = self.parent_port;
        match (self.parent_ip, self.proto.family()) {
            (Some(ip), _) => vec![(SocketAddr::new(ip, p), false)],
            (None, Family::V4) => vec![(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p), false)],
            (None, Family::V6) => vec![(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), p), false)],
            (None, Family::Any) => vec![
                (SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), p), false),
                (SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), p), true),
            ],
        }
    }

    /// The families this spec listens on: `[ipv4, ipv6]`.
    pub fn families(&self) -> [bool; 2] {
        match (self.parent_ip, self.proto.family()) {
            (Some(ip), _) => [ip.is_ipv4(), ip.is_ipv6()],
            (None, Family::V4) => [true, false],
            (None, Family::V6) => [false, true],
            (None, Family::Any) => [true, true],
        }
    }

    /// Whether two specs would listen on an overlapping address: same
    /// transport (TCP and UDP ports never conflict), same family, same
    /// port, and equal IPs or one of them unspecified.
    pub fn conflicts_with(&self, other: &PortSpec) -> bool {
        if self.parent_port != other.parent_port || self.proto.is_udp() != other.proto.is_udp() {
            return false;
        }
        let a = self.families();
        let b = other.families();
        let shared = (a[0] && b[0]) || (a[1] && b[1]);
        if !shared {
            return false;
        }
        match (self.parent_ip, other.parent_ip) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = |ip: &IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        // With a child IP, four fields are needed: "all addresses" is then
        // an empty parent IP field (":8080:10.0.0.2:80"), or the text would
        // read as PARENTIP:PARENTPORT:CHILDPORT.
        match (&self.parent_ip, &self.child_ip) {
            (Some(p), _) => write!(f, "{}:", ip(p))?,
            (None, Some(_)) => f.write_str(":")?,
            (None, None) => {}
        }
        write!(f, "{}:", self.parent_port)?;
        if let Some(c) = &self.child_ip {
            write!(f, "{}:", ip(c))?;
        }
        write!(f, "{}/{}", self.child_port, self.proto)
    }
}

/// Splits `s` on ':' while keeping bracketed IPv6 literals whole.
fn split_fields<'a>(spec: &str, s: &'a str) -> Result<Vec<&'a str>, SpecError> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let end = after
                .find(']')
                .ok_or_else(|| invalid(spec, "unterminated '[' in IPv6 address"))?;
            out.push(&rest[..end + 2]);
            rest = &after[end + 1..];
            match rest.strip_prefix(':') {
                Some(r) => rest = r,
                None if rest.is_empty() => {}
                None => return Err(invalid(spec, "expected ':' after ']'")),
            }
            if rest.is_empty() && s.ends_with(':') {
                out.push("");
            }
        } else {
            match rest.find(':') {
                Some(i) => {
                    out.push(&rest[..i]);
                    rest = &rest[i + 1..];
                    if rest.is_empty() {
                        out.push("");
                    }
                }
                None => {
                    out.push(rest);
                    rest = "";
                }
            }
        }
    }
    Ok(out)
}

fn parse_ip(spec: &str, field: &str, what: &str) -> Result<IpAddr, SpecError> {
    let inner = match field.strip_prefix('[') {
        Some(r) => {
            let v6 = r
                .strip_suffix(']')
                .ok_or_else(|| invalid(spec, format!("bad {what} {field:?}")))?;
            return v6
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| invalid(spec, format!("{what} {field:?} is not an IPv6 address")));
        }
        None => field,
    };
    inner.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
        if inner.contains(':') {
            invalid(spec, format!("IPv6 {what} {inner:?} must be in brackets"))
        } else {
            invalid(spec, format!("{what} {inner:?} is not an IP address"))
        }
    })
}

fn parse_port(spec: &str, field: &str, what: &str) -> Result<u16, SpecError> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(spec, format!("{what} {field:?} is not a number")));
    }
    match field.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(invalid(
            spec,
            format!("{what} {field} is out of range (1-65535)"),
        )),
    }
}

/// The fields of a `-p` text: protocol, parent IP, parent port(s), child
/// IP, child port(s); the port fields still unparsed.
struct Fields<'a> {
    proto: Proto,
    parent_ip: Option<IpAddr>,
    parent_port: &'a str,
    child_ip: Option<IpAddr>,
    child_port: &'a str,
}

/// Splits `[PARENTIP:]PARENTPORT:[CHILDIP:]CHILDPORT[/PROTO]` into fields.
fn fields(spec: &str) -> Result<Fields<'_>, SpecError> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, p)) => (b, p.parse::<Proto>().map_err(|e| invalid(spec, e))?),
        None => (spec, Proto::Tcp),
    };
    if body.is_empty() {
        return Err(invalid(spec, "empty"));
    }
    let f = split_fields(spec, body)?;
    let (pip, pport, cip, cport) = match f.as_slice() {
        [pp, cp] => (None, *pp, None, *cp),
        [ip, pp, cp] => (Some(*ip), *pp, None, *cp),
        [ip, pp, cip, cp] => (Some(*ip), *pp, Some(*cip), *cp),
        _ => {
            return Err(invalid(
                spec,
                "expected PARENTPORT:CHILDPORT, PARENTIP:PARENTPORT:CHILDPORT or \
                 PARENTIP:PARENTPORT:CHILDIP:CHILDPORT (IPv6 addresses in brackets)",
            ))
        }
    };
    let ip = |field: Option<&str>, what| match field {
        Some("") | None => Ok(None),
        Some(ip) => parse_ip(spec, ip, what).map(Some),
    };
    Ok(Fields {
        proto,
        parent_ip: ip(pip, "parent IP")?,
        parent_port: pport,
        child_ip: ip(cip, "child IP")?,
        child_port: cport,
    })
}

impl FromStr for PortSpec {
    type Err = SpecError;

    /// Parses `PARENTPORT:CHILDPORT`, `PARENTIP:PARENTPORT:CHILDPORT` or
    /// `PARENTIP:PARENTPORT:CHILDIP:CHILDPORT`, each with an optional
    /// `/tcp`, `/tcp4` or `/tcp6`. Port ranges are [`PortRangeSpec`]'s.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let f = fields(spec)?;
        PortSpec {
            proto: f.proto,
            parent_ip: f.parent_ip,
            parent_port: parse_port(spec, f.parent_port, "parent port")?,
            child_ip: f.child_ip,
            child_port: parse_port(spec, f.child_port, "child port")?,
        }
        .validate(spec)
    }
}

/// An inclusive range of ports: `N` (one port) or `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// How many ports the range holds (at least one).
    pub fn count(self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// The ports in order.
    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }

    /// Parses `N` or `FIRST-LAST` (docker's rules: both ends 1-65535, the
    /// first not above the last).
    fn parse(spec: &str, field: &str, what: &str) -> Result<PortRange, SpecError> {
        let Some((a, b)) = field.split_once('-') else {
            let p = parse_port(spec, field, what)?;
            return Ok(PortRange { first: p, last: p });
        };
        if a.is_empty() || b.is_empty() {
            return Err(invalid(
                spec,
                format!("{what} range {field:?} is empty on one side (expected FIRST-LAST)"),
            ));
        }
        let end = |s: &str| -> Result<u32, SpecError> {
            if !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(invalid(
                    spec,
                    format!("{what} range {field:?}: {s:?} is not a number"),
                ));
            }
            Ok(s.parse::<u32>().unwrap_or(u32::MAX))
        };
        let (first, last) = (end(a)?, end(b)?);
        if first == 0 || first > 65535 || last > 65535 {
            return Err(invalid(
                spec,
                format!("{what} range {field} is out of range (ports 1-65535)"),
            ));
        }
        if first > last {
            return Err(invalid(
                spec,
                format!("{what} range {field} is inverted (its first port is above its last)"),
            ));
        }
        // Both ends checked to be within 1..=65535 above.
        Ok(PortRange {
            first: first as u16,
            last: last as u16,
        })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A `-p` spec whose ports may be ranges, as `docker run -p` takes them:
/// `8000-8010:9000-9010`, `127.0.0.1:8000-8010:8000-8010/udp`,
/// `8000-8010:80`. A pure parse: [`PortRangeSpec::expand`] turns it into
/// the [`PortSpec`]s to publish; the API stays one port per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRangeSpec {
    /// The text as given, named in every message about the spec.
    pub text: String,
    pub proto: Proto,
    pub parent_ip: Option<IpAddr>,
    pub parent: PortRange,
    pub child_ip: Option<IpAddr>,
    pub child: PortRange,
}

/// What publishing a [`PortRangeSpec`] means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expansion {
    /// Publish every spec, all of them or none (equal-length ranges, or a
    /// single port).
    All(Vec<PortSpec>),
    /// Publish the first of these whose parent port is free, and only
    /// that one (a parent range to one child port, as docker does).
    FirstFree(Vec<PortSpec>),
}

impl Expansion {
    /// Every spec the expansion may publish, in order.
    pub fn specs(&self) -> &[PortSpec] {
        match self {
            Expansion::All(s) | Expansion::FirstFree(s) => s,
        }
    }
}

impl PortRangeSpec {
    /// The specs to publish, and whether all or the first free one. The
    /// ranges were checked when parsing, so this cannot fail.
    pub fn expand(&self) -> Expansion {
        let one = |parent_port, child_port| PortSpec {
            proto: self.proto,
            parent_ip: self.parent_ip,
            parent_port,
            child_ip: self.child_ip,
            child_port,
        };
        if self.child.count() == 1 && self.parent.count() > 1 {
            let c = self.child.first;
            Expansion::FirstFree(self.parent.ports().map(|p| one(p, c)).collect())
        } else {
            Expansion::All(
                self.parent
                    .ports()
                    .zip(self.child.ports())
                    .map(|(p, c)| one(p, c))
                    .collect(),
            )
        }
    }
}

impl From<PortSpec> for PortRangeSpec {
    fn from(s: PortSpec) -> Self {
        PortRangeSpec {
            text: s.to_string(),
            proto: s.proto,
            parent_ip: s.parent_ip,
            parent: PortRange {
                first: s.parent_port,
                last: s.parent_port,
            },
            child_ip: s.child_ip,
            child: PortRange {
                first: s.child_port,
                last: s.child_port,
            },
        }
    }
}

impl fmt::Display for PortRangeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for PortRangeSpec {
    type Err = SpecError;

    /// Parses a [`PortSpec`] text whose ports may be `FIRST-LAST` ranges:
    /// equal lengths, or a parent range to one child port.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let f = fields(spec)?;
        let parent = PortRange::parse(spec, f.parent_port, "parent port")?;
        let child = PortRange::parse(spec, f.child_port, "child port")?;
        if parent.count() != child.count() && child.count() != 1 {
            return Err(invalid(
                spec,
                format!(
                    "the parent range {parent} ({} ports) and the child range {child} ({} \
                     ports) differ in length: give ranges of equal length, or a parent range \
                     and one child port",
                    parent.count(),
                    child.count()
                ),
            ));
        }
        // The family rules are the same for every port of the range:
        // check them on the first, and keep their normalisation (0.0.0.0
        // means tcp4, and so on).
        let first = PortSpec {
            proto: f.proto,
            parent_ip: f.parent_ip,
            parent_port: parent.first,
            child_ip: f.child_ip,
            child_port: child.first,
        }
        .validate(spec)?;
        Ok(PortRangeSpec {
            text: spec.to_string(),
            proto: first.proto,
            parent_ip: first.parent_ip,
            parent,
            child_ip: first.child_ip,
            child,
        })
    }
}

/// The first two `-p` specs that would listen on the same address and
/// port, as texts. A parent range to one child port takes whichever of
/// its ports is free, so only its own conflicts with no free port left
/// are found when binding.
pub fn first_conflict(publish: &[PortRangeSpec]) -> Option<(String, String)> {
    let fixed: Vec<(&PortRangeSpec, PortSpec)> = publish
        .iter()
        .flat_map(|r| match r.expand() {
            Expansion::All(specs) => specs.into_iter().map(|s| (r, s)).collect(),
            Expansion::FirstFree(_) => Vec::new(),
        })
        .collect();
    for (i, (ra, a)) in fixed.iter().enumerate() {
        if let Some((rb, b)) = fixed[..i]
            .iter()
            .find(|(rb, b)| !std::ptr::eq(*rb, *ra) && b.conflicts_with(a))
        {
            let show = |r: &PortRangeSpec, s: &PortSpec| {
                if r.parent.count() == 1 {
                    s.to_string()
                } else {
                    format!("{s} (of {r})")
                }
            };
            return Some((show(ra, a), show(rb, b)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> PortSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// (spec, proto, parent IP, parent port, child IP, child port)
    type Case<'a> = (&'a str, Proto, Option<&'a str>, u16, Option<&'a str>, u16);

    #[test]
    fn accepted_forms() {
        let cases: &[Case] = &[
            ("8080:80", Proto::Tcp, None, 8080, None, 80),
            ("8080:80/tcp4", Proto::Tcp4, None, 8080, None, 80),
            (
                "127.0.0.2:8080:80",
                Proto::Tcp,
                Some("127.0.0.2"),
                8080,
                None,
                80,
            ),
            (
                "127.0.0.2:8080:80/tcp",
                Proto::Tcp,
                Some("127.0.0.2"),
                8080,
                None,
                80,
            ),
            ("0.0.0.0:8080:80", Proto::Tcp4, None, 8080, None, 80),
            ("[::]:8080:80", Proto::Tcp6, None, 8080, None, 80),
            (
                "[::1]:8080:80/tcp6",
                Proto::Tcp6,
                Some("::1"),
                8080,
                None,
                80,
            ),
            (
                "10.0.0.1:80:10.1.1.1:8080",
                Proto::Tcp,
                Some("10.0.0.1"),
                80,
                Some("10.1.1.1"),
                8080,
            ),
            (
                "[::1]:80:[fd00::2]:8080",
                Proto::Tcp,
                Some("::1"),
                80,
                Some("fd00::2"),
                8080,
            ),
            ("65535:1", Proto::Tcp, None, 65535, None, 1),
        ];
        for (s, proto, pip, pp, cip, cp) in cases {
            let got = ok(s);
            assert_eq!(got.proto, *proto, "{s}");
            assert_eq!(got.parent_ip, pip.map(|x| x.parse().unwrap()), "{s}");
            assert_eq!(got.parent_port, *pp, "{s}");
            assert_eq!(got.child_ip, cip.map(|x| x.parse().unwrap()), "{s}");
            assert_eq!(got.child_port, *cp, "{s}");
        }
    }

    #[test]
    fn rejected_forms_name_the_spec() {
        let cases = [
            ("80", "expected"),
            ("0:80", "parent port 0 is out of range"),
            ("8080:0", "child port 0 is out of range"),
            ("70000:80", "out of range"),
            ("abc:80", "not a number"),
            ("1.2.3.4.5:80:80", "not an IP address"),
            ("::1:8080:80", "expected"),
            ("[::1:8080:80", "unterminated"),
            ("8080:80/sctp", "not supported yet"),
            ("127.0.0.1:8080:[::1]:80/udp", "family"),
            ("[::1]:8080:80/udp4", "does not match protocol udp4"),
            ("8080:80/xyz", "unknown protocol"),
            ("127.0.0.1:8080:[::1]:80", "family"),
            ("[::1]:8080:80/tcp4", "does not match protocol tcp4"),
            ("8080:0.0.0.0:80", "parent IP \"8080\" is not an IP address"),
            ("1.2.3.4:8080:0.0.0.0:80", "cannot be dialed"),
            // Found by the port_spec_text fuzz target: accepted, it became
            // tcp6 with an IPv4 child, which prints as a refused spec.
            ("[::]:80:1.0.0.0:80", "not of the parent IP ::'s family"),
            (
                "0.0.0.0:80:[fd00::1]:80",
                "not of the parent IP 0.0.0.0's family",
            ),
            ("", "empty"),
            ("8080:80:", "is not an IP address"),
        ];
        for (s, want) in cases {
            let err = s.parse::<PortSpec>().expect_err(s).to_string();
            assert!(err.contains(&format!("{s:?}")), "{s}: {err}");
            assert!(err.contains(want), "{s}: {err} (want {want:?})");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "127.0.0.2:8080:80/tcp",
            "[::1]:80:[::1]:8080/tcp6",
            "8080:80/tcp",
            "127.0.0.2:5353:53/udp",
            "[::1]:53:53/udp6",
        ] {
            let spec = ok(s);
            assert_eq!(ok(&spec.to_string()), spec);
        }
    }

    /// Found by the fuzz targets' round-trip property: a spec for all
    /// addresses with a child IP printed as `80:10.0.0.2:8080/tcp4`, which
    /// reads as PARENTIP:PARENTPORT:CHILDPORT and is refused (seen in
    /// `forwarder status` and the logs).
    #[test]
    fn all_addresses_with_a_child_ip_print_as_a_spec_that_parses() {
        for (input, shown) in [
            ("0.0.0.0:80:10.0.0.2:8080", ":80:10.0.0.2:8080/tcp4"),
            ("[::]:1:[fd00::1]:2", ":1:[fd00::1]:2/tcp6"),
            (":8080:127.0.0.1:80", ":8080:127.0.0.1:80/tcp"),
        ] {
            let spec = ok(input);
            assert_eq!(spec.parent_ip, None, "{input}");
            assert_eq!(spec.to_string(), shown, "{input}");
            assert_eq!(ok(shown), spec, "{input}");
        }
    }

    #[test]
    fn listen_addrs_for_unspecified_tcp_cover_both_families() {
        let a = ok("8080:80").listen_addrs();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], ("0.0.0.0:8080".parse().unwrap(), false));
        assert_eq!(a[1], ("[::]:8080".parse().unwrap(), true));
        assert_eq!(
            ok("8080:80/tcp6").listen_addrs(),
            vec![("[::]:8080".parse().unwrap(), false)]
        );
    }

    #[test]
    fn conflict_matrix() {
        let c = |a: &str, b: &str| ok(a).conflicts_with(&ok(b));
        assert!(c("8080:80", "127.0.0.1:8080:81"));
        assert!(c("8080:80", "[::1]:8080:81"));
        assert!(c("8080:80/tcp4", "127.0.0.1:8080:81"));
        assert!(!c("8080:80/tcp4", "[::1]:8080:81"));
        assert!(!c("8080:80/tcp6", "127.0.0.1:8080:81"));
        assert!(c("127.0.0.1:8080:80", "127.0.0.1:8080:81"));
        assert!(!c("127.0.0.1:8080:80", "127.0.0.2:8080:81"));
        assert!(!c("127.0.0.1:8080:80", "127.0.0.1:8081:80"));
        assert!(c("[::]:8080:80", "[::1]:8080:80"));
        // TCP and UDP on the same port are separate ports; UDP conflicts
        // follow the same family rules among themselves.
        assert!(!c("8080:80/tcp", "8080:80/udp"));
        assert!(!c("127.0.0.1:8080:80/udp", "127.0.0.1:8080:80/tcp4"));
        assert!(c("8080:80/udp", "127.0.0.1:8080:81/udp4"));
        assert!(!c("8080:80/udp4", "[::1]:8080:81/udp"));
        assert!(c("127.0.0.1:53:53/udp", "127.0.0.1:53:53/udp4"));
    }

    #[test]
    fn udp_forms() {
        let s = ok("0.0.0.0:53:53/udp");
        assert_eq!((s.proto, s.parent_ip), (Proto::Udp4, None));
        let s = ok("[::]:53:53/udp");
        assert_eq!((s.proto, s.parent_ip), (Proto::Udp6, None));
        let a = ok("53:53/udp").listen_addrs();
        assert_eq!(a[0], ("0.0.0.0:53".parse().unwrap(), false));
        assert_eq!(a[1], ("[::]:53".parse().unwrap(), true));
        assert!(ok("53:53/udp").proto.is_udp());
        assert!(!ok("53:53/tcp").proto.is_udp());
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    fn specs(list: &[&str]) -> Vec<PortSpec> {
        list.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    }

    #[test]
    fn ranges_expand_as_docker_does() {
        let all = |l: &[&str]| Expansion::All(specs(l));
        let first_free = |l: &[&str]| Expansion::FirstFree(specs(l));
        let cases = [
            ("8080:80", all(&["8080:80"])),
            ("8000-8000:9000", all(&["8000:9000"])),
            ("8000-8000:9000-9000", all(&["8000:9000"])),
            (
                "8000-8002:9000-9002",
                all(&["8000:9000", "8001:9001", "8002:9002"]),
            ),
            (
                "127.0.0.1:8000-8001:8000-8001/udp",
                all(&["127.0.0.1:8000:8000/udp", "127.0.0.1:8001:8001/udp"]),
            ),
            (
                "[::1]:8000-8001:[fd00::2]:80-81/tcp6",
                all(&[
                    "[::1]:8000:[fd00::2]:80/tcp6",
                    "[::1]:8001:[fd00::2]:81/tcp6",
                ]),
            ),
            (
                "0.0.0.0:8000-8001:80-81",
                all(&["0.0.0.0:8000:80", "0.0.0.0:8001:81"]),
            ),
            (
                "8000-8002:80",
                first_free(&["8000:80", "8001:80", "8002:80"]),
            ),
            (
                "127.0.0.2:65534-65535:10.0.0.2:53/udp",
                first_free(&[
                    "127.0.0.2:65534:10.0.0.2:53/udp",
                    "127.0.0.2:65535:10.0.0.2:53/udp",
                ]),
            ),
            ("1-1:65535-65535", all(&["1:65535"])),
        ];
        for (text, want) in cases {
            let r: PortRangeSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.expand(), want, "{text}");
            assert_eq!(r.to_string(), text);
        }
    }

    #[test]
    fn bad_ranges_are_refused_naming_the_spec() {
        let cases = [
            (
                "8010-8000:9010-9000",
                "parent port range 8010-8000 is inverted",
            ),
            (
                "8000-8010:9010-9000",
                "child port range 9010-9000 is inverted",
            ),
            ("65530-65540:80", "range 65530-65540 is out of range"),
            ("80:65535-70000", "range 65535-70000 is out of range"),
            ("0-10:0-10", "range 0-10 is out of range"),
            ("8000-:80", "empty on one side"),
            ("-8000:80", "empty on one side"),
            ("8000-8010:-", "empty on one side"),
            ("8000-80x0:80", "\"80x0\" is not a number"),
            ("8000-8010:9000-9004", "differ in length"),
            ("8000:9000-9001", "differ in length"),
            ("99999999999999999999-1:80", "out of range"),
            ("127.0.0.1:8000-8001:[::1]:80-81", "family"),
            ("8000-8001:80-81/sctp", "not supported yet"),
            ("8000-8001", "expected"),
        ];
        for (text, want) in cases {
            let err = text.parse::<PortRangeSpec>().expect_err(text).to_string();
            assert!(err.contains(&format!("{text:?}")), "{text}: {err}");
            assert!(err.contains(want), "{text}: {err} (want {want:?})");
        }
    }

    #[test]
    fn a_single_spec_is_a_range_of_one() {
        for text in ["8080:80", "127.0.0.2:53:53/udp", "[::1]:80:[::1]:8080/tcp6"] {
            let spec: PortSpec = text.parse().expect(text);
            let r: PortRangeSpec = text.parse().expect(text);
            assert_eq!(r.expand(), Expansion::All(vec![spec.clone()]), "{text}");
            assert_eq!(PortRangeSpec::from(spec.clone()).expand(), r.expand());
        }
        // PortSpec itself (the fuzz targets, the API) still takes one port.
        let err = "8000-8001:80".parse::<PortSpec>().expect_err("range");
        assert!(err.to_string().contains("not a number"), "{err}");
    }
}

/// RootlessKit's JSON `PortSpec`, as `POST /v1/ports` takes it and
/// `GET /v1/ports` returns it. Empty strings and zero ports are omitted on
/// output, as Go's `omitempty` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proto: String,
    #[serde(default, rename = "parentIP", skip_serializing_if = "String::is_empty")]
    pub parent_ip: String,
    #[serde(default, rename = "parentPort", skip_serializing_if = "is_zero")]
    pub parent_port: i64,
    #[serde(default, rename = "childIP", skip_serializing_if = "String::is_empty")]
    pub child_ip: String,
    #[serde(default, rename = "childPort", skip_serializing_if = "is_zero")]
    pub child_port: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl From<&PortSpec> for ApiSpec {
    fn from(s: &PortSpec) -> Self {
        ApiSpec {
            proto: s.proto.as_str().to_string(),
            parent_ip: s.parent_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            parent_port: s.parent_port.into(),
            child_ip: s.child_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            child_port: s.child_port.into(),
        }
    }
}

impl TryFrom<&ApiSpec> for PortSpec {
    type Error = String;

    /// Validates an API request with the same rules as the command line.
    fn try_from(a: &ApiSpec) -> Result<Self, String> {
        let proto = match a.proto.as_str() {
            "" => return Err("proto is required (tcp, tcp4, tcp6, udp, udp4 or udp6)".into()),
            p => p.parse::<Proto>()?,
        };
        let port = |n: i64, what: &str| -> Result<u16, String> {
            u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{what} {n} is out of range (1-65535)"))
        };
        let ip = |s: &str, what: &str| -> Result<Option<IpAddr>, String> {
            if s.is_empty() {
                return Ok(None);
            }
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map(Some)
                .map_err(|_| format!("{what} {s:?} is not an IP address"))
        };
        let spec = PortSpec {
            proto,
            parent_ip: ip(&a.parent_ip, "parentIP")?,
            parent_port: port(a.parent_port, "parentPort")?,
            child_ip: ip(&a.child_ip, "childIP")?,
            child_port: port(a.child_port, "childPort")?,
        };
        let text = spec.to_string();
        spec.validate(&text).map_err(|e| match e {
            SpecError::Invalid { why, .. } => why,
        })
    }
}

#[cfg(test)]
mod api_tests {
    use super::*;

    fn conv(json: &str) -> Result<PortSpec, String> {
        let a: ApiSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        PortSpec::try_from(&a)
    }

    #[test]
    fn rootlessctl_bodies() {
        let s = conv(r#"{"proto":"tcp","parentIP":"127.0.0.2","parentPort":8080,"childPort":80}"#)
            .unwrap();
        assert_eq!(s, "127.0.0.2:8080:80/tcp".parse().unwrap());
        let s = conv(
            r#"{"proto":"tcp6","parentIP":"::1","parentPort":8080,"childIP":"::1","childPort":80}"#,
        )
        .unwrap();
        assert_eq!(s, "[::1]:8080:[::1]:80/tcp6".parse().unwrap());
        assert_eq!(
            conv(r#"{"proto":"tcp","parentPort":8080,"childPort":80}"#).unwrap(),
            "8080:80/tcp".parse().unwrap()
        );
    }

    #[test]
    fn bad_bodies() {
        let cases = [
            (
                r#"{"proto":"sctp","parentPort":1,"childPort":1}"#,
                "not supported yet",
            ),
            (
                r#"{"proto":"sctp9","parentPort":1,"childPort":1}"#,
                "unknown protocol",
            ),
            (r#"{"parentPort":1,"childPort":1}"#, "proto is required"),
            (
                r#"{"proto":"tcp","parentPort":0,"childPort":1}"#,
                "parentPort 0 is out of range",
            ),
            (
                r#"{"proto":"tcp","parentPort":65536,"childPort":1}"#,
                "out of range",
            ),
            (
                r#"{"proto":"tcp","parentPort":1,"childPort":-1}"#,
                "childPort -1",
            ),
            (
                r#"{"proto":"tcp","parentIP":"1.2.3","parentPort":1,"childPort":1}"#,
                "not an IP",
            ),
            (
                r#"{"proto":"tcp4","parentPort":1,"childIP":"::1","childPort":1}"#,
                "does not match",
            ),
            (
                r#"{"proto":"tcp","parentPort":"80","childPort":1}"#,
                "invalid type",
            ),
        ];
        for (body, want) in cases {
            let err = conv(body).expect_err(body);
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn output_omits_empty_fields() {
        let a = ApiSpec::from(&"8080:80/tcp".parse::<PortSpec>().unwrap());
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"proto":"tcp","parentPort":8080,"childPort":80}"#
        );
    }
}
