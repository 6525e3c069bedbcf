//! What this kernel can do for the engines, and which engine auto mode
//! picks on it: the probes behind `forwarder check` and the kernel rule in
//! [`crate::engine::select`].
//!
//! The decision ([`decide`]) is a pure function of the kernel version and
//! the probe results, so it is tested by table without a kernel. The
//! probes ([`probe`]) ask the running kernel: BPF permission (creating a
//! small hash map), the map types the ebpf engine uses (SOCKHASH since
//! 4.18, RINGBUF since 5.8), the sk_skb program type and its
//! `bpf_sk_redirect_hash` helper, and finally loading and attaching the
//! engine's real programs, both variants (verdict only, and stream parser
//! in front of it) — the same step auto mode takes.
//!
//! Kernel rule: [`avoid_ebpf`] names kernel lines on which the ebpf engine
//! must not be chosen automatically even though its programs load, with
//! the evidence. The VM matrix (`cargo xtask vm-test`, bench/results/
//! vm-matrix.md) is what justifies each entry.

use std::fmt;

use serde::Serialize;

use crate::engine::EngineKind;

/// A kernel version, as `uname -r` starts (`6.1.0-57-cloud-amd64` is
/// 6.1.0: Debian keeps the third number at 0 for its ABI; the line is what
/// the rules look at). The one parser of kernel versions: the controller's
/// rules, its startup and xtask all read them here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub(crate) struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// Parses the leading `MAJOR.MINOR[.PATCH]` of a release string; what
    /// follows the numbers (`-57-cloud-amd64`, `+deb13-amd64`) is ignored.
    /// `None` unless it starts with two numbers.
    pub fn parse(release: &str) -> Option<Version> {
        let head = release
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?;
        let mut it = head.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Version {
            major,
            minor,
            patch,
        })
    }

    /// The running kernel's version, if its release string parses.
    pub fn running() -> Option<Version> {
        Version::parse(&release())
    }

    pub const fn new(major: u32, minor: u32) -> Version {
        Version {
            major,
            minor,
            patch: 0,
        }
    }

    /// `(major, minor)`: the kernel line.
    pub fn line(self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The running kernel's release string, as `uname -r` prints it (e.g.
/// `6.1.0-57-cloud-amd64`); empty if it cannot be read.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The oldest kernel the ebpf engine is offered on at all: sk_skb
/// verdict-only mode (a verdict without a parser) arrived in 5.13.
pub(crate) const MIN_EBPF: Version = Version::new(5, 13);

/// A kernel line on which auto mode does not pick ebpf, and why.
struct Avoid {
    /// Lines from `from` up to and including `through` (major, minor).
    from: (u32, u32),
    through: (u32, u32),
    why: &'static str,
}

/// Kernel lines where the ebpf engine's programs load but the VM matrix
/// showed it is not safe.
///
/// Empty, on the evidence so far (bench/results/vm-matrix.md): on Debian's
/// 6.1 (6.1.0-57, upstream stable 6.1.192, not the 6.1.0 that the
/// 6.4-era sockmap fixes post-date) both program variants load and the ebpf
/// engine passes every case that tests kernel behaviour: early data, half
/// close each way, resets, 64 MiB each way with SHA-256, bytes staying in
/// the kernel, resets under load. The only failures of the first run were
/// time limits under QEMU TCG that copy and splice missed as well, gone
/// with the limits stretched (FWD_TEST_TIME_SCALE). On 6.12
/// (6.12.117+deb12) both variants passed all 32 ebpf cases with the limits
/// stretched. A line that fails an
/// ebpf case that splice passes gets an entry here, with the failing cases.
const AVOID: &[Avoid] = &[];

/// Why auto mode must not pick ebpf on kernel `v`, if it must not.
pub(crate) fn avoid_ebpf(v: Version) -> Option<String> {
    avoid_in(AVOID, v)
}

fn avoid_in(list: &[Avoid], v: Version) -> Option<String> {
    if v < MIN_EBPF {
        return Some(format!(
            "kernel {v} is older than {MIN_EBPF}, which added the sk_skb verdict-only mode"
        ));
    }
    list.iter()
        .find(|a| a.from <= v.line() && v.line() <= a.through)
        .map(|a| format!("kernel {v}: {}", a.why))
}

/// One probe's result: `Ok(())` or what failed.
pub(crate) type Probe = Result<(), String>;

/// What the running kernel offers the engines.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Probes {
    /// Creating a BPF map is permitted (CAP_BPF, or root).
    #[serde(serialize_with = "ser_probe")]
    pub bpf: Probe,
    /// SOCKHASH maps (4.18+).
    #[serde(serialize_with = "ser_probe")]
    pub sockhash: Probe,
    /// RINGBUF maps (5.8+), the engine's event ring.
    #[serde(serialize_with = "ser_probe")]
    pub ringbuf: Probe,
    /// The sk_skb program type.
    #[serde(serialize_with = "ser_probe")]
    pub sk_skb: Probe,
    /// `bpf_sk_redirect_hash` from sk_skb programs.
    #[serde(serialize_with = "ser_probe")]
    pub redirect_helper: Probe,
    /// The engine's real programs, verdict only, load and attach.
    #[serde(serialize_with = "ser_probe")]
    pub programs_verdict: Probe,
    /// The same with the stream parser in front.
    #[serde(serialize_with = "ser_probe")]
    pub programs_parser: Probe,
    /// splice(2) between a pipe and a socket's kind of descriptor works.
    #[serde(serialize_with = "ser_probe")]
    pub splice: Probe,
    /// The local-client path's programs (sock_ops, sk_msg) load and
    /// attach, to the cgroup v2 root.
    #[serde(serialize_with = "ser_probe")]
    pub local_path: Probe,
    /// The local-client path's self-test: a blocking read on a socket in a
    /// sockmap keeps TCP's contract (the `local` module's `probe`).
    #[serde(serialize_with = "ser_probe")]
    pub local_blocking_read: Probe,
}

fn ser_probe<S: serde::Serializer>(p: &Probe, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(2))?;
    m.serialize_entry("ok", &p.is_ok())?;
    if let Err(e) = p {
        m.serialize_entry("error", e)?;
    }
    m.end()
}

/// Auto mode's choice and its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Decision {
    pub engine: EngineKind,
    pub reason: String,
}

/// Whether the ebpf engine can run safely here, from the kernel version
/// and the probes: its programs must load (the verdict-only variant, the
/// default) and the kernel must not be on the [`avoid_ebpf`] list.
pub(crate) fn ebpf_usable(v: Version, p: &Probes) -> Result<(), String> {
    if let Some(why) = avoid_ebpf(v) {
        return Err(format!("not safe here: {why}"));
    }
    let steps: [(&str, &Probe); 5] = [
        ("BPF not permitted", &p.bpf),
        ("no SOCKHASH maps", &p.sockhash),
        ("no RINGBUF maps", &p.ringbuf),
        ("no sk_skb programs", &p.sk_skb),
        ("the programs did not load", &p.programs_verdict),
    ];
    for (what, probe) in steps {
        if let Err(e) = probe {
            return Err(format!("unavailable: {what}: {e}"));
        }
    }
    Ok(())
}

/// The pure decision: what auto mode picks given the kernel version and
/// what the probes found. Auto mode runs splice, which every supported
/// kernel has, also where ebpf could run (see
/// [`crate::engine::AUTO_REASON`]); the reason says whether `--mode ebpf`
/// would work here. Copy only if even splice failed.
pub(crate) fn decide(v: Version, p: &Probes) -> Decision {
    let ebpf = match ebpf_usable(v, p) {
        Ok(()) => format!("ebpf is available on kernel {v} with --mode ebpf"),
        Err(why) => format!("ebpf {why}"),
    };
    let local = p.local_path.as_ref().and(p.local_blocking_read.as_ref());
    // The engine that carries the path must load (its sk_skb programs
    // load first), as in `run`'s auto mode.
    if let (Ok(()), Ok(_), Ok(())) = (&p.splice, local, ebpf_usable(v, p)) {
        return Decision {
            engine: EngineKind::Ebpf,
            reason: crate::engine::AUTO_LOCAL_REASON.into(),
        };
    }
    let ebpf = match local {
        Ok(_) => ebpf,
        Err(why) => format!("{ebpf}; the local-client path is off: {why}"),
    };
    if p.splice.is_ok() {
        Decision {
            engine: EngineKind::Splice,
            reason: format!("{}; {ebpf}", crate::engine::AUTO_REASON),
        }
    } else {
        Decision {
            engine: EngineKind::Copy,
            reason: format!(
                "splice(2) failed ({}); {ebpf}",
                p.splice.as_ref().err().map_or("", String::as_str)
            ),
        }
    }
}

/// Without the `ebpf` cargo feature there is no BPF object to probe with.
#[cfg(not(feature = "ebpf"))]
pub(crate) fn probe() -> Probes {
    let no = || Err("built without the `ebpf` cargo feature".to_string());
    Probes {
        bpf: no(),
        sockhash: no(),
        ringbuf: no(),
        sk_skb: no(),
        redirect_helper: no(),
        programs_verdict: no(),
        programs_parser: no(),
        splice: splice_works(),
        local_path: no(),
        local_blocking_read: no(),
    }
}

/// Runs every probe against the running kernel (the program probes load
/// the real programs into an engine that is never started).
#[cfg(feature = "ebpf")]
pub(crate) fn probe() -> Probes {
    use aya::maps::MapType;
    use aya::programs::ProgramType;
    use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
    let map = |t: MapType, name: &str| -> Probe {
        match is_map_supported(t) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("the kernel has no {name} maps")),
            Err(e) => Err(format!("{e}")),
        }
    };
    let bpf = bpf_permitted();
    if let Err(e) = &bpf {
        // The type probes would fail the same way and prove nothing.
        let skipped = || Err(format!("not probed: {e}"));
        return Probes {
            bpf: bpf.clone(),
            sockhash: skipped(),
            ringbuf: skipped(),
            sk_skb: skipped(),
            redirect_helper: skipped(),
            programs_verdict: skipped(),
            programs_parser: skipped(),
            splice: splice_works(),
            local_path: skipped(),
            local_blocking_read: skipped(),
        };
    }
    let sockhash = map(MapType::SockHash, "SOCKHASH");
    let ringbuf = map(MapType::RingBuf, "RINGBUF");
    let sk_skb = match is_program_supported(ProgramType::SkSkb) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the kernel has no sk_skb programs (CONFIG_BPF_STREAM_PARSER)".into()),
        Err(e) => Err(format!("{e}")),
    };
    let redirect_helper =
        match is_helper_supported(ProgramType::SkSkb, BpfHelper::BPF_FUNC_sk_redirect_hash) {
            Ok(true) => Ok(()),
            Ok(false) => Err("bpf_sk_redirect_hash is not available to sk_skb programs".into()),
            Err(e) => Err(format!("{e}")),
        };
    let load = |parser: bool| -> Probe {
        crate::engine::ebpf::EbpfEngine::load(crate::engine::ebpf::Options {
            parser,
            ..Default::default()
        })
        .map(drop)
        .map_err(|e| format!("{e:#}"))
    };
    let local = local_path();
    Probes {
        bpf,
        sockhash,
        ringbuf,
        sk_skb,
        redirect_helper,
        programs_verdict: load(false),
        programs_parser: load(true),
        splice: splice_works(),
        local_path: local.as_ref().map(drop).map_err(Clone::clone),
        local_blocking_read: local.and_then(|l| l),
    }
}

/// The local-client path loads and attaches (to the default cgroup), and
/// then (inside) the result of its self-test.
#[cfg(feature = "ebpf")]
fn local_path() -> Result<Probe, String> {
    use crate::engine::local::{probe::BlockingRead, BLOCKING_READ_BROKEN};
    let cgroup = crate::engine::local::default_cgroup().ok_or_else(|| {
        "no cgroup v2 hierarchy (/sys/fs/cgroup/unified or /sys/fs/cgroup)".to_string()
    })?;
    let loaded = crate::engine::ebpf::EbpfEngine::load(crate::engine::ebpf::Options {
        local: Some(cgroup),
        local_required: true,
        local_forced: true,
        ..Default::default()
    })
    .map_err(|e| format!("{e:#}"))?;
    Ok(match loaded.local_blocking_read() {
        Some(BlockingRead::Kept) => Ok(()),
        Some(BlockingRead::Eagain) => Err(BLOCKING_READ_BROKEN.to_string()),
        None => Err("the self-test did not run".to_string()),
    })
}

/// The capabilities the BPF paths use, held or not, and what is lost
/// without each.
pub(crate) fn capabilities() -> Vec<(&'static str, bool, &'static str)> {
    use caps::{CapSet, Capability};
    let has = |c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false);
    vec![
        (
            "CAP_BPF",
            has(Capability::CAP_BPF),
            "no ebpf engine and no local-client path",
        ),
        (
            "CAP_NET_ADMIN",
            has(Capability::CAP_NET_ADMIN),
            "no ebpf engine and no local-client path",
        ),
        (
            "CAP_PERFMON",
            has(Capability::CAP_PERFMON),
            "no local-client path (its sk_msg program reads the sender's TCP sequence, which \
             needs it); the ebpf engine's sk_skb path still runs",
        ),
    ]
}

/// Creating a one-entry hash map is the least a BPF user must be allowed.
#[cfg(feature = "ebpf")]
fn bpf_permitted() -> Probe {
    use aya::maps::MapType;
    match aya::sys::is_map_supported(MapType::Hash) {
        Ok(true) => Ok(()),
        Ok(false) => Err("BPF map creation failed".into()),
        Err(e) => {
            let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
            let what = io.map_or_else(|| e.to_string(), |io| format!("{e}: {io}"));
            Err(
                if io.and_then(std::io::Error::raw_os_error) == Some(libc::EPERM) {
                    format!(
                        "{what} (the ebpf engine needs CAP_BPF and CAP_NET_ADMIN, or root: \
                     `setcap cap_bpf,cap_net_admin+ep` on the binary)"
                    )
                } else {
                    what
                },
            )
        }
    }
}

/// splice(2) from a pipe into another pipe: the syscall exists and works.
fn splice_works() -> Probe {
    let r = (|| -> std::io::Result<()> {
        let (r1, w1) = nix::unistd::pipe()?;
        let (r2, w2) = nix::unistd::pipe()?;
        nix::unistd::write(&w1, b"x")?;
        let n = nix::fcntl::splice(&r1, None, &w2, None, 1, nix::fcntl::SpliceFFlags::empty())?;
        drop((r2, w2));
        if n == 1 {
            Ok(())
        } else {
            Err(std::io::Error::other("splice moved nothing"))
        }
    })();
    r.map_err(|e| format!("splice(2): {e}"))
}

/// `forwarder check`: prints the kernel, the probes, the engines that can
/// run and auto mode's choice, as text or JSON.
pub fn check(json: bool) -> anyhow::Result<()> {
    let release = release();
    let version = Version::parse(&release);
    let p = probe();
    let decision = version.map(|v| decide(v, &p));
    let ebpf_ok = p.programs_verdict.is_ok() || p.programs_parser.is_ok();
    if json {
        let v = serde_json::json!({
            "kernel": { "release": release, "version": version },
            "probes": p,
            "capabilities": capabilities().iter().map(|(n, held, lost)| serde_json::json!({
                "name": n, "held": held, "without": lost,
            })).collect::<Vec<_>>(),
            "engines": {
                "local_path": p.local_path.is_ok(),
                "ebpf": p.programs_verdict.is_ok(),
                "ebpf_parser": p.programs_parser.is_ok(),
                "splice": p.splice.is_ok(),
                "copy": true,
            },
            "avoid_ebpf": version.and_then(avoid_ebpf),
            "auto": decision,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let show = |p: &Probe| match p {
        Ok(()) => "yes".to_string(),
        Err(e) => format!("no: {e}"),
    };
    println!(
        "kernel: {release} ({})",
        version.map_or("version not recognised".into(), |v| v.to_string())
    );
    println!("probes:");
    println!("  BPF permitted:                  {}", show(&p.bpf));
    println!("  SOCKHASH maps:                  {}", show(&p.sockhash));
    println!("  RINGBUF maps:                   {}", show(&p.ringbuf));
    println!("  sk_skb programs:                {}", show(&p.sk_skb));
    println!(
        "  bpf_sk_redirect_hash in sk_skb: {}",
        show(&p.redirect_helper)
    );
    println!("engines:");
    println!(
        "  ebpf (verdict only):            {}",
        show(&p.programs_verdict)
    );
    println!(
        "  ebpf (stream parser, --ebpf-parser): {}",
        show(&p.programs_parser)
    );
    println!("  splice:                         {}", show(&p.splice));
    println!("  copy:                           yes");
    println!(
        "  local-client path (sock_ops + sk_msg):  {}",
        show(&p.local_path)
    );
    println!(
        "  blocking reads on admitted sockets:     {}",
        show(&p.local_blocking_read)
    );
    println!("capabilities:");
    for (name, held, lost) in capabilities() {
        if held {
            println!("  {name}: held");
        } else {
            println!("  {name}: missing: {lost}");
        }
    }
    if ebpf_ok {
        if let Some(why) = version.and_then(avoid_ebpf) {
            println!("  note: the ebpf programs load, but {why}");
        }
    }
    match decision {
        Some(d) => println!("auto mode picks: {} ({})", d.engine, d.reason),
        None => println!("auto mode: kernel version {release:?} not recognised"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ok() -> Probes {
        Probes {
            bpf: Ok(()),
            sockhash: Ok(()),
            ringbuf: Ok(()),
            sk_skb: Ok(()),
            redirect_helper: Ok(()),
            programs_verdict: Ok(()),
            programs_parser: Ok(()),
            splice: Ok(()),
            local_path: Ok(()),
            local_blocking_read: Ok(()),
        }
    }

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_parse_from_release_strings() {
        let some = |major, minor, patch| {
            Some(Version {
                major,
                minor,
                patch,
            })
        };
        for (release, want) in [
            // Debian: the third number is 0, the ABI follows.
            ("6.1.0-57-cloud-amd64", some(6, 1, 0)),
            ("6.12.117+deb12-cloud-amd64", some(6, 12, 117)),
            ("6.12.48+deb13-amd64", some(6, 12, 48)),
            // Ubuntu, RHEL, a plain build, Firecracker's guests.
            ("5.15.0-91-generic", some(5, 15, 0)),
            ("5.14.0-427.el9.x86_64", some(5, 14, 0)),
            ("6.18.0", some(6, 18, 0)),
            ("6.18.44-fc-v669", some(6, 18, 44)),
            ("6.8", some(6, 8, 0)),
            ("6.8-rc1", some(6, 8, 0)),
            // Garbage.
            ("", None),
            ("linux", None),
            ("6", None),
            ("6.", None),
            (".6.1", None),
            ("v6.1.0", None),
            ("99999999999.1", None),
        ] {
            assert_eq!(Version::parse(release), want, "{release:?}");
        }
        assert_eq!(Version::new(6, 1), some(6, 1, 0).unwrap());
        assert_eq!(some(5, 14, 3).unwrap().line(), (5, 14));
        assert!(Version::new(5, 13) < Version::new(5, 15));
    }

    #[test]
    fn decision_table() {
        let eperm = || Err("Operation not permitted".to_string());
        let mut no_bpf = all_ok();
        no_bpf.bpf = eperm();
        no_bpf.programs_verdict = eperm();
        no_bpf.programs_parser = eperm();
        let mut no_load = all_ok();
        no_load.programs_verdict = Err("verifier".into());
        let ok = all_ok();
        let mut eagain = all_ok();
        eagain.local_blocking_read = Err("tcp_bpf_recvmsg EAGAIN".into());
        let mut no_perfmon = all_ok();
        no_perfmon.local_path = Err("needs CAP_PERFMON".into());
        let mut nothing = no_bpf.clone();
        nothing.splice = Err("ENOSYS".into());
        // (kernel, probes, engine, words the reason must hold)
        let rows: Vec<(&str, &Probes, EngineKind, &str)> = vec![
            (
                "6.18.44",
                &ok,
                EngineKind::Ebpf,
                "local clients take the local-client path",
            ),
            (
                "6.18.44",
                &eagain,
                EngineKind::Splice,
                "available on kernel 6.18",
            ),
            (
                "6.12.117+deb12",
                &eagain,
                EngineKind::Splice,
                "local-client path is off: tcp_bpf_recvmsg",
            ),
            (
                "6.12.117+deb12",
                &no_perfmon,
                EngineKind::Splice,
                "with --mode ebpf; the local-client path is off: needs CAP_PERFMON",
            ),
            ("6.18.44", &no_bpf, EngineKind::Splice, "BPF not permitted"),
            ("6.18.44", &no_load, EngineKind::Splice, "did not load"),
            ("5.10.0", &ok, EngineKind::Splice, "older than 5.13"),
            ("4.19.0", &no_bpf, EngineKind::Splice, "older than 5.13"),
            ("4.19.0", &nothing, EngineKind::Copy, "splice(2) failed"),
        ];
        for (k, p, want, words) in rows {
            let d = decide(v(k), p);
            assert_eq!(d.engine, want, "{k}: {d:?}");
            assert!(d.reason.contains(words), "{k}: {d:?}");
        }
    }

    #[test]
    fn a_listed_line_is_avoided_and_its_neighbours_are_not() {
        let list = [Avoid {
            from: (6, 1),
            through: (6, 3),
            why: "loses bytes",
        }];
        for (k, avoided) in [
            ("6.0.19", false),
            ("6.1.0-57-cloud-amd64", true),
            ("6.3.13", true),
            ("6.4.0", false),
            ("6.12.117+deb12", false),
            ("5.12.0", true),
        ] {
            let r = avoid_in(&list, v(k));
            assert_eq!(r.is_some(), avoided, "{k}: {r:?}");
        }
        assert!(avoid_in(&list, v("6.2.1"))
            .is_some_and(|w| w.contains("loses bytes") && w.contains("6.2.1")));
    }

    #[test]
    fn avoid_list_is_consistent() {
        for a in AVOID {
            assert!(a.from <= a.through, "{}", a.why);
            let inside = Version::new(a.from.0, a.from.1);
            assert!(avoid_ebpf(inside).is_some());
        }
    }
}
