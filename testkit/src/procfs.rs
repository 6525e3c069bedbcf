//! Readings from /proc, for the tests and the bench alike: a process's CPU
//! time and memory, its descriptors, its threads' capabilities, its dial
//! agents, the machine's CPU time per CPU, and the run-time statistics of
//! the BPF programs a process holds.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

/// Clock ticks per second of /proc's CPU times.
fn hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .context("malformed /proc/PID/stat")
    };
    // utime and stime are fields 14 and 15: indices 11 and 12 here.
    Ok(ticks(11)? + ticks(12)?)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / hz())
}

/// The value of a `KEY:` line of /proc/PID/status, trimmed.
fn status_field(pid: u32, key: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// A `Vm*:` line of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let v = status_field(pid, key)?;
    v.split_whitespace()
        .next()
        .and_then(|kb| kb.parse::<u64>().ok())
        .with_context(|| format!("malformed {key} {v:?} in /proc/{pid}/status"))
}

/// A capability set (`CapEff:`, `CapPrm:`, ...) of /proc/PID/status.
pub fn status_caps(pid: u32, key: &str) -> Result<u64> {
    let v = status_field(pid, key)?;
    u64::from_str_radix(&v, 16)
        .with_context(|| format!("malformed {key} {v:?} in /proc/{pid}/status"))
}

/// Open pipe descriptors of a process.
pub fn pipe_fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("pipe:"))
        .count())
}

/// The children of `pid` (of any of its threads) whose command line
/// contains `needle`.
pub fn children_running(pid: u32, needle: &str) -> Vec<u32> {
    // Children are listed per thread that forked them.
    let children: String = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains(needle)
        })
        .collect()
}

/// A `Vm*:` line of /proc/PID/status, in MiB.
fn status_mib(pid: u32, key: &str) -> Result<f64> {
    Ok(status_kib(pid, key)? as f64 / 1024.0)
}

/// Peak resident set size (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmRSS:")
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// The machine's CPU time from /proc/stat: the total line and one per CPU,
/// each as (busy, kernel, all) clock ticks. busy = user + nice + system +
/// irq + softirq + steal (guest time is inside user); kernel = system +
/// irq + softirq, which is where the kernel's softirq and worker threads
/// (the ebpf engine's redirects) are charged; all adds idle and iowait.
#[derive(Clone, Debug, Default)]
pub struct CpuTimes {
    total: [u64; 3],
    per_cpu: Vec<[u64; 3]>,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let mut t = CpuTimes::default();
        for line in stat.lines().filter(|l| l.starts_with("cpu")) {
            let mut it = line.split_whitespace();
            let name = it.next().unwrap_or_default();
            let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
            let get = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal
            let kernel = get(2) + get(5) + get(6);
            let busy = get(0) + get(1) + kernel + get(7);
            let all = busy + get(3) + get(4);
            if name == "cpu" {
                t.total = [busy, kernel, all];
            } else {
                t.per_cpu.push([busy, kernel, all]);
            }
        }
        Ok(t)
    }

    /// What was used between `self` (earlier) and `later`.
    pub fn until(&self, later: &CpuTimes) -> CpuUse {
        let d = |a: &[u64; 3], b: &[u64; 3], i: usize| b[i].saturating_sub(a[i]) as f64;
        CpuUse {
            busy_s: d(&self.total, &later.total, 0) / hz(),
            kernel_s: d(&self.total, &later.total, 1) / hz(),
            per_cpu_busy: self
                .per_cpu
                .iter()
                .zip(&later.per_cpu)
                .map(|(a, b)| {
                    let all = d(a, b, 2);
                    if all > 0.0 {
                        d(a, b, 0) / all
                    } else {
                        0.0
                    }
                })
                .collect(),
        }
    }
}

/// Machine-wide CPU use over an interval.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuUse {
    /// Busy CPU seconds, all CPUs together.
    pub busy_s: f64,
    /// Of which in the kernel (system, irq, softirq).
    pub kernel_s: f64,
    /// Per CPU, the busy fraction of the interval.
    pub per_cpu_busy: Vec<f64>,
}

/// Run-time statistics of one BPF program (kernel.bpf_stats_enabled).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ProgStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// BPF programs by id: their type and run-time statistics.
pub type BpfReading = BTreeMap<u32, (String, ProgStats)>;

/// The BPF programs a process holds, by program id, with their run-time
/// statistics, from /proc/PID/fdinfo (zero unless kernel.bpf_stats_enabled
/// is 1; kernel 5.1+).
pub fn bpf_programs(pid: u32) -> Result<BpfReading> {
    let mut progs = BTreeMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let (Some(kind), Some(id)) = (field("prog_type:"), field("prog_id:")) else {
            continue;
        };
        let num = |k: &str| field(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stats = ProgStats {
            run_cnt: num("run_cnt:"),
            run_time_ns: num("run_time_ns:"),
        };
        if let Ok(id) = id.parse() {
            progs.insert(id, (kind, stats));
        }
    }
    Ok(progs)
}

/// CAP_NET_BIND_SERVICE as a bit of a capability set.
pub const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

/// One thread's name and capability sets, from /proc/PID/task/TID/status.
#[derive(Debug, Clone)]
pub struct ThreadCaps {
    pub tid: u32,
    pub name: String,
    /// CapEff.
    pub eff: u64,
    /// CapPrm.
    pub prm: u64,
}

/// Every thread of `pid` with its capability sets.
pub fn thread_caps(pid: u32) -> Vec<ThreadCaps> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let hex = |k: &str| {
            field(k)
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .unwrap_or(u64::MAX)
        };
        out.push(ThreadCaps {
            tid,
            name: field("Name:").unwrap_or_default(),
            eff: hex("CapEff:"),
            prm: hex("CapPrm:"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_cpu_times_add_up() {
        let a = CpuTimes::now().expect("/proc/stat");
        assert!(!a.per_cpu.is_empty());
        // Burn a little CPU so the interval is not empty.
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < std::time::Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let u = a.until(&CpuTimes::now().expect("/proc/stat"));
        assert!(u.busy_s > 0.0 && u.kernel_s <= u.busy_s, "{u:?}");
        assert!(u.per_cpu_busy.iter().all(|f| (0.0..=1.0).contains(f)));
        assert!(u.per_cpu_busy.iter().any(|f| *f > 0.0), "{u:?}");
    }

    #[test]
    fn own_process_readings() {
        let me = std::process::id();
        assert!(rss_mib(me).expect("VmRSS") > 0.0);
        assert!(peak_rss_mib(me).expect("VmHWM") >= rss_mib(me).expect("VmRSS") * 0.5);
        assert!(fd_count(me).expect("fds") >= 3);
        assert!(cpu_seconds(me).expect("cpu") >= 0.0);
        // No BPF programs held here.
        assert!(bpf_programs(me).expect("fdinfo").is_empty());
    }
}
