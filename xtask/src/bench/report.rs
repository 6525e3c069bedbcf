//! The bench's Markdown report, JSON and chart, from [`super::Results`].

use std::fmt::Write as _;
use std::process::Command;

use anyhow::Result;
use serde_json::{json, Value};

use super::{
    difference, median, min_max, ratio, Cell, Placement, Plan, Results, System, ThrKey, Workload,
    AUTO_CHOICES, BASELINE, CLIENTS, DIRECTIONS, FORWARDERS, SIZES, STREAMS,
};
use crate::util::output;

pub struct Report<'a> {
    pub plan: &'a Plan,
    pub systems: &'a [System],
    pub res: &'a Results,
    pub machine: Machine,
}

/// Facts about the machine and the run, read once before rendering.
pub struct Machine {
    /// When the report was made, UTC.
    pub date: String,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// `iperf3 --version`'s first line.
    pub iperf: String,
    pub ncpu: usize,
    /// The command line the bench ran with.
    pub command: String,
    /// /proc/loadavg before the first run.
    pub load: String,
    /// The descriptor limit the bench ran with.
    pub nofile: u64,
}

impl Machine {
    /// Reads the date, the kernel release, iperf3's version, the CPU count and the
    /// command line; `load` and `nofile` come from the start of the run.
    pub fn read(load: String, nofile: u64) -> Machine {
        let first_line = |program: &str, args: &[&str]| {
            output(Command::new(program).args(args))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown".to_string())
        };
        Machine {
            date: crate::util::UtcTime::now().to_second(),
            kernel: crate::util::kernel_release()
                .ok()
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown".to_string()),
            iperf: first_line("iperf3", &["--version"]),
            ncpu: std::thread::available_parallelism().map_or(0, |n| n.get()),
            command: std::iter::once("cargo xtask".to_string())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" "),
            load,
            nofile,
        }
    }
}

/// The JSON of the workload sections (null where a workload did not run).
#[derive(Default)]
struct WorkloadsJson {
    throughput: serde_json::Map<String, Value>,
    latency: Value,
    rate: Value,
    scale: Value,
    docker: Value,
}

/// A reason fit for one table cell.
fn cell(reason: &str) -> String {
    let r = reason.replace(['|', '\n'], " ");
    let r: String = r.chars().take(300).collect();
    format!("not run: {r}")
}

/// A system's cell when it has runs, or why it has none.
fn with_runs<'c, T>(c: Option<&'c Cell<T>>, sys: &System) -> Result<&'c Cell<T>, String> {
    match c {
        Some(c) if !c.runs.is_empty() => Ok(c),
        other => Err(other
            .and_then(|c| c.failed.clone())
            .or_else(|| sys.failed.clone())
            .unwrap_or_else(|| "no results".into())),
    }
}

/// "median (min-max)" with `p` decimals.
fn spread(v: &[f64], p: usize) -> String {
    let (lo, hi) = min_max(v);
    format!("{:.p$} ({lo:.p$}-{hi:.p$})", median(v))
}

/// A target line: what, the figure, the goal, met or not.
struct Target {
    what: String,
    figure: Option<f64>,
    unit: &'static str,
    goal: String,
    met: Option<bool>,
}

impl Target {
    /// Met when `figure` is at least `bound`.
    fn at_least(what: String, figure: Option<f64>, unit: &'static str, bound: f64) -> Self {
        Target {
            what,
            figure,
            unit,
            goal: format!(">= {bound}"),
            met: figure.map(|x| x >= bound),
        }
    }

    /// Met when `figure` is at most `bound`.
    fn at_most(what: String, figure: Option<f64>, unit: &'static str, bound: f64) -> Self {
        Target {
            what,
            figure,
            unit,
            goal: format!("<= {bound}"),
            met: figure.map(|x| x <= bound),
        }
    }
}

/// Each CPU's median busy share over `runs`, as "a% / b% / ...".
fn per_cpu_busy(runs: Option<&Vec<super::ThrRun>>, ncpu: usize) -> String {
    let Some(runs) = runs else {
        return String::new();
    };
    (0..ncpu)
        .map(|c| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.cpu.per_cpu_busy.get(c).copied())
                .collect();
            format!("{:.0}%", median(&v) * 100.0)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

impl Report<'_> {
    /// Gbit/s per repetition of a system for one stream count and direction.
    fn gbits(&self, name: &str, key: ThrKey) -> Vec<f64> {
        self.res
            .thr
            .get(name)
            .and_then(|m| m.get(&key))
            .map(|runs| runs.iter().map(|r| r.gbit).collect())
            .unwrap_or_default()
    }

    /// Ratio of two systems' throughput, pair by pair; NaN without both.
    fn thr_ratio(&self, a: &str, b: &str, key: ThrKey) -> f64 {
        let (x, y) = (self.gbits(a, key), self.gbits(b, key));
        if x.is_empty() || y.is_empty() {
            return f64::NAN;
        }
        ratio(&x, &y)
    }

    /// One latency percentile (0 = p50 .. 3 = max) per repetition.
    fn lat(&self, size: usize, name: &str, pct: usize) -> Vec<f64> {
        self.res
            .lat
            .get(&size)
            .and_then(|m| m.get(name))
            .map(|c| c.runs.iter().map(|l| l[pct]).collect())
            .unwrap_or_default()
    }

    /// Connections per second per repetition.
    fn cps(&self, clients: usize, name: &str) -> Vec<f64> {
        self.res
            .rate
            .get(&clients)
            .and_then(|m| m.get(name))
            .map(|c| c.runs.iter().map(|r| r.conn_per_s).collect())
            .unwrap_or_default()
    }

    /// The placement the targets are judged on: unpinned, as users run it.
    const PRIMARY: Placement = Placement::Unpinned;

    /// Among the engines auto mode may pick, the one with the best median
    /// of `figure` (higher is better unless `lower`), with its values.
    fn best_engine(
        &self,
        figure: impl Fn(&str) -> Vec<f64>,
        lower: bool,
    ) -> Option<(&'static str, Vec<f64>)> {
        AUTO_CHOICES
            .iter()
            .map(|&e| (e, figure(e)))
            .filter(|(_, v)| !v.is_empty())
            .max_by(|a, b| {
                let (x, y) = (median(&a.1), median(&b.1));
                if lower {
                    y.total_cmp(&x)
                } else {
                    x.total_cmp(&y)
                }
            })
    }

    /// auto mode against the best engine: the median of per-repetition
    /// ratios auto / best (best / auto when `lower` is better), so 1.0 is
    /// as good as the best.
    fn auto_target(&self, what: String, figure: impl Fn(&str) -> Vec<f64>, lower: bool) -> Target {
        let auto = figure("auto");
        let x = self.best_engine(&figure, lower).and_then(|(best, b)| {
            (!auto.is_empty()).then(|| {
                if lower {
                    (best, ratio(&b, &auto))
                } else {
                    (best, ratio(&auto, &b))
                }
            })
        });
        let what = match x {
            Some((best, _)) => format!("{what} (best: {best})"),
            None => what,
        };
        Target::at_least(what, x.map(|x| x.1), "x", 0.95)
    }

    /// The machine's busy CPU seconds per GB over a system's runs in one
    /// placement; NaN without runs.
    fn cpu_per_gb(&self, name: &str, place: Placement) -> f64 {
        let Some(m) = self.res.thr.get(name) else {
            return f64::NAN;
        };
        let runs: Vec<_> = m
            .iter()
            .filter(|(k, _)| k.0 == place)
            .flat_map(|(_, v)| v)
            .collect();
        let gb: f64 = runs.iter().map(|r| r.bytes).sum::<f64>() / 1e9;
        if gb > 0.0 {
            runs.iter().map(|r| r.cpu.busy_s).sum::<f64>() / gb
        } else {
            f64::NAN
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        if self.plan.has(Workload::Throughput) {
            self.throughput_targets(&mut t);
        }
        if self.plan.has(Workload::Latency) {
            self.latency_targets(&mut t);
        }
        if self.plan.has(Workload::Rate) {
            self.rate_targets(&mut t);
        }
        if let Some(u) = &self.res.udp {
            for (what, x, bound) in u.targets() {
                t.push(Target::at_least(what, x, "x", bound));
            }
        }
        if self.plan.has(Workload::Scale) {
            self.scale_targets(&mut t);
        }
        t
    }

    /// Bulk throughput: ebpf against splice and pasta, auto against the
    /// best engine, and ebpf's machine CPU per GB.
    fn throughput_targets(&self, t: &mut Vec<Target>) {
        let finite = |v: f64| v.is_finite().then_some(v);
        let p = Self::PRIMARY;
        let streams_name = |n: u32| {
            if n == 1 {
                "one stream".to_string()
            } else {
                format!("{n} streams")
            }
        };
        for streams in STREAMS {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                for (other, goal) in [("splice", 1.0), ("pasta", 1.2)] {
                    let x = finite(self.thr_ratio("ebpf", other, (p, streams, d)));
                    t.push(Target::at_least(
                        format!(
                            "ebpf bulk throughput {dir}, {}, unpinned, x {other}",
                            streams_name(streams)
                        ),
                        x,
                        "x",
                        goal,
                    ));
                }
            }
        }
        for streams in STREAMS {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                t.push(self.auto_target(
                    format!(
                        "auto bulk throughput {dir}, {}, unpinned, x the best engine",
                        streams_name(streams)
                    ),
                    |n| self.gbits(n, (p, streams, d)),
                    false,
                ));
            }
        }
        let (e, s) = (self.cpu_per_gb("ebpf", p), self.cpu_per_gb("splice", p));
        t.push(Target::at_most(
            "ebpf machine CPU per GB, unpinned, x splice's".into(),
            finite(e / s),
            "x",
            0.8,
        ));
    }

    /// Latency: ebpf against splice, direct and pasta; auto against the best
    /// engine.
    fn latency_targets(&self, t: &mut Vec<Target>) {
        let (e, s) = (self.lat(1, "ebpf", 0), self.lat(1, "splice", 0));
        let x = (!e.is_empty() && !s.is_empty()).then(|| difference(&e, &s));
        t.push(Target::at_most(
            "ebpf p50 latency 1 B, minus splice's (required)".into(),
            x,
            "us",
            0.0,
        ));
        for size in SIZES {
            let (e, d) = (self.lat(size, "ebpf", 0), self.lat(size, "direct", 0));
            let x = (!e.is_empty() && !d.is_empty()).then(|| difference(&e, &d));
            t.push(Target::at_most(
                format!("ebpf p50 latency {size} B, minus direct's"),
                x,
                "us",
                10.0,
            ));
            let (e, p) = (self.lat(size, "ebpf", 2), self.lat(size, "pasta", 2));
            let x = (!e.is_empty() && !p.is_empty()).then(|| difference(&e, &p));
            t.push(Target::at_most(
                format!("ebpf p99.9 latency {size} B, minus pasta's"),
                x,
                "us",
                0.0,
            ));
        }
        for size in SIZES {
            t.push(self.auto_target(
                format!("auto p50 latency {size} B, the best engine's / auto's"),
                |n| self.lat(size, n, 0),
                true,
            ));
        }
    }

    /// The p99 setup times of a system's connection-rate runs.
    fn p99s(&self, clients: usize, name: &str) -> Vec<f64> {
        self.res
            .rate
            .get(&clients)
            .and_then(|m| m.get(name))
            .map(|c| c.runs.iter().map(|r| r.p99_setup_us).collect())
            .unwrap_or_default()
    }

    /// Connection rate: auto against splice, pasta, RootlessKit, direct and
    /// the best engine; its p99 setup time against direct's; no failed
    /// connection with the most clients.
    fn rate_targets(&self, t: &mut Vec<Target>) {
        let most = CLIENTS[CLIENTS.len() - 1];
        for clients in CLIENTS.into_iter().filter(|&c| c < most) {
            let (a, p, d) = (
                self.cps(clients, "auto"),
                self.cps(clients, "pasta"),
                self.cps(clients, "direct"),
            );
            let x = (!a.is_empty() && !p.is_empty()).then(|| ratio(&a, &p));
            t.push(Target::at_least(
                format!("auto connection rate, {clients} client(s), x pasta"),
                x,
                "x",
                1.0,
            ));
            let x = (!a.is_empty() && !d.is_empty()).then(|| ratio(&a, &d));
            t.push(Target::at_least(
                format!("auto connection rate, {clients} client(s), x direct (the goal)"),
                x,
                "x",
                0.6,
            ));
            let (pa, pd) = (self.p99s(clients, "auto"), self.p99s(clients, "direct"));
            let x = (!pa.is_empty() && !pd.is_empty()).then(|| median(&pa) / median(&pd));
            t.push(Target::at_most(
                format!("auto p99 setup time, {clients} client(s), x direct's"),
                x,
                "x",
                2.0,
            ));
        }
        // The spread of the repetitions, (max - min) / median, against
        // direct's own: an occasional slow path shows here.
        let spread_of = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            (hi - lo) / median(v)
        };
        for clients in CLIENTS {
            let (a, d) = (self.cps(clients, "auto"), self.cps(clients, "direct"));
            let x = (a.len() > 1 && d.len() > 1).then(|| {
                let (sa, sd) = (spread_of(&a), spread_of(&d));
                if sd > 0.0 {
                    sa / sd
                } else if sa > 0.0 {
                    f64::INFINITY
                } else {
                    1.0
                }
            });
            t.push(Target::at_most(
                format!("auto connection rate spread, {clients} client(s), x direct's"),
                x,
                "x",
                1.5,
            ));
        }
        let failed = self
            .res
            .rate
            .get(&most)
            .and_then(|m| m.get("auto"))
            .map(|c| c.runs.iter().map(|r| r.failed as f64).sum::<f64>());
        t.push(Target::at_most(
            format!("auto failed connections, {most} clients"),
            failed,
            "",
            0.0,
        ));
        for clients in CLIENTS {
            let (a, s, r) = (
                self.cps(clients, "auto"),
                self.cps(clients, "splice"),
                self.cps(clients, "rootlesskit"),
            );
            let x = (!a.is_empty() && !s.is_empty()).then(|| ratio(&a, &s));
            t.push(Target::at_least(
                format!("auto connection rate, {clients} client(s), x splice"),
                x,
                "x",
                1.0,
            ));
            let x = (!a.is_empty() && !r.is_empty()).then(|| ratio(&a, &r));
            t.push(Target::at_least(
                format!("auto connection rate, {clients} client(s), x RootlessKit"),
                x,
                "x",
                2.0,
            ));
            t.push(self.auto_target(
                format!("auto connection rate, {clients} client(s), x the best engine"),
                |n| self.cps(clients, n),
                false,
            ));
        }
    }

    /// Scale: the ebpf forwarder's memory while holding idle connections.
    fn scale_targets(&self, t: &mut Vec<Target>) {
        let held = self
            .res
            .scale
            .get("ebpf")
            .and_then(|c| c.runs.iter().filter_map(|r| r.rss_mib).reduce(f64::max));
        let mb = |mib: f64| mib * 1024.0 * 1024.0 / 1e6;
        for (what, v) in [
            ("RSS while holding", held),
            (
                "peak RSS over the whole run, which includes holding",
                self.res.peak_rss.get("ebpf").copied(),
            ),
        ] {
            t.push(Target::at_most(
                format!(
                    "ebpf forwarder {what} {} idle connections",
                    self.plan.scale_conns
                ),
                v.map(mb),
                "MB",
                30.0,
            ));
        }
    }

    /// The Markdown report and the JSON of the run. Runs no command: the
    /// machine's facts were read before ([`Machine::read`]).
    pub fn render(&self) -> Result<(String, Value)> {
        let mut md = String::new();
        self.render_header(&mut md)?;
        let targets = self.render_targets(&mut md)?;
        let workloads = self.render_workloads(&mut md)?;
        self.render_baseline(&mut md)?;
        let resources = self.render_resources(&mut md)?;
        self.render_footer(&mut md)?;
        Ok((md, self.json(targets, workloads, resources)))
    }

    /// The title and how the run was made.
    fn render_header(&self, md: &mut String) -> Result<()> {
        let m = &self.machine;
        writeln!(md, "# forwarder against direct loopback and its peers\n")?;
        writeln!(
            md,
            "- date: {}; kernel {}; {} CPUs; {}",
            m.date, m.kernel, m.ncpu, m.iperf
        )?;
        writeln!(
            md,
            "- load average (1, 5, 15 min) before the first run: {}",
            m.load
        )?;
        writeln!(md, "- command: `{}`", m.command)?;
        writeln!(
            md,
            "- direct: client and server both in the child namespace; engines: one forwarder \
             per engine, kept for all workloads, publishing 127.0.0.1:PORT into the child"
        )?;
        writeln!(
            md,
            "- peers, in the host namespace on 127.0.0.1:PORT: socat (`TCP-LISTEN:PORT,fork` + \
             `EXEC:ip netns exec CHILD socat STDIO TCP\\:127.0.0.1\\:5201`, two processes started \
             per connection); RootlessKit as user fwdtest (slirp4netns, builtin port driver, \
             its servers in its own child namespace); pasta `--netns CHILD -t 127.0.0.1/PORT:5201`"
        )?;
        writeln!(
            md,
            "- every workload repeated and interleaved across the systems; figures are the \
             median (min-max) over repetitions; ratios are medians of per-repetition ratios; \
             descriptor limit {}\n",
            m.nofile
        )?;
        Ok(())
    }

    /// The targets table; returns its JSON rows.
    fn render_targets(&self, md: &mut String) -> Result<Vec<Value>> {
        let targets = self.targets();
        let mut targets_json = Vec::new();
        if targets.is_empty() {
            return Ok(targets_json);
        }
        writeln!(md, "## Targets\n")?;
        writeln!(md, "| target | figure | goal | |")?;
        writeln!(md, "|---|---|---|---|")?;
        for t in &targets {
            let fig = t
                .figure
                .map_or_else(|| "n/a".to_string(), |f| format!("{f:.2} {}", t.unit));
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            writeln!(
                md,
                "| {} | {fig} | {} {} | {verdict} |",
                t.what, t.goal, t.unit
            )?;
            targets_json.push(json!({"target": t.what, "figure": t.figure, "unit": t.unit,
                "goal": t.goal, "met": t.met}));
        }
        writeln!(md)?;
        Ok(targets_json)
    }

    /// One section per workload the plan ran; returns their JSON.
    fn render_workloads(&self, md: &mut String) -> Result<WorkloadsJson> {
        let plan = self.plan;
        let mut out = WorkloadsJson::default();
        if plan.has(Workload::Throughput) {
            self.render_throughput(md, &mut out.throughput)?;
        }
        if plan.has(Workload::Latency) {
            out.latency = self.render_latency(md)?;
        }
        if plan.has(Workload::Rate) {
            out.rate = self.render_rate(md)?;
        }
        if let Some(u) = &self.res.udp {
            u.render(md, "##");
        }
        if plan.has(Workload::Scale) {
            out.scale = self.render_scale(md)?;
        }
        if let (Some(d), true) = (&self.res.docker, plan.has(Workload::Docker)) {
            self.render_docker(md, d)?;
            out.docker = serde_json::to_value(d)?;
        }
        Ok(out)
    }

    /// With `--baseline`: each mode of this build beside the same mode of
    /// the baseline binary, medians with their min-max over the
    /// repetitions, and the ratio of the medians (above 1: this build is
    /// faster; for latency, below 1 is).
    fn render_baseline(&self, md: &mut String) -> Result<()> {
        let has = |n: &str| {
            self.systems
                .iter()
                .any(|s| s.name == n && s.failed.is_none())
        };
        let modes: Vec<&str> = FORWARDERS
            .into_iter()
            .filter(|m| has(m) && has(&format!("{m}{BASELINE}")))
            .collect();
        if modes.is_empty() {
            return Ok(());
        }
        writeln!(md, "## Against the baseline binary\n")?;
        writeln!(
            md,
            "Every mode ran twice in this run, with this build and with the `--baseline` \
             binary (rows `MODE{BASELINE}` above), interleaved. Medians (min-max) over the \
             repetitions, unpinned; ratio = this build's median / the baseline's.\n"
        )?;
        writeln!(md, "| mode | figure | this build | baseline | ratio |")?;
        writeln!(md, "|---|---|---|---|---|")?;
        for m in modes {
            let base = format!("{m}{BASELINE}");
            let mut row = |what: String, a: Vec<f64>, b: Vec<f64>, p: usize| -> Result<()> {
                if a.is_empty() || b.is_empty() {
                    return Ok(());
                }
                let r = median(&a) / median(&b);
                writeln!(
                    md,
                    "| {m} | {what} | {} | {} | {r:.2} |",
                    spread(&a, p),
                    spread(&b, p)
                )?;
                Ok(())
            };
            for streams in STREAMS {
                for (d, dir) in DIRECTIONS.iter().enumerate() {
                    let key = (Self::PRIMARY, streams, d);
                    row(
                        format!("throughput {streams} stream(s) {dir}, Gbit/s"),
                        self.gbits(m, key),
                        self.gbits(&base, key),
                        1,
                    )?;
                }
            }
            for size in SIZES {
                row(
                    format!("{size}-byte round trip p50, us"),
                    self.lat(size, m, 0),
                    self.lat(size, &base, 0),
                    1,
                )?;
            }
            for clients in CLIENTS {
                row(
                    format!("connections/s, {clients} client(s)"),
                    self.cps(clients, m),
                    self.cps(clients, &base),
                    0,
                )?;
            }
        }
        writeln!(md)?;
        Ok(())
    }

    /// The systems that did not run, and the bytes each forwarder carried.
    fn render_footer(&self, md: &mut String) -> Result<()> {
        let failed: Vec<_> = self
            .systems
            .iter()
            .filter_map(|s| Some((s, s.failed.as_ref()?)))
            .collect();
        if !failed.is_empty() {
            writeln!(md, "\nNot run, in full:\n")?;
            for (s, why) in failed {
                writeln!(md, "- {}: {}", s.name, why.replace('\n', " "))?;
            }
        }
        writeln!(
            md,
            "\nBytes each forwarder carried, by data path (its final statistics):\n"
        )?;
        for (mode, st) in &self.res.fwd_stats {
            let paths = st["bytes_by_path"]
                .as_object()
                .map(|p| {
                    p.iter()
                        .map(|(k, v)| format!("{k} {:.2} GB", v.as_f64().unwrap_or(f64::NAN) / 1e9))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|| "none reported".to_string());
            writeln!(
                md,
                "- {mode}: {paths}; {} connections, {} active at the end",
                st["connections"], st["active"]
            )?;
        }
        Ok(())
    }

    /// The run's JSON: the machine, the plan, every section's figures.
    fn json(&self, targets: Vec<Value>, w: WorkloadsJson, resources: Value) -> Value {
        let (plan, m) = (self.plan, &self.machine);
        json!({
            "date": m.date,
            "kernel": m.kernel,
            "cpus": m.ncpu,
            "iperf3": m.iperf,
            "command": m.command,
            "workloads": plan.workloads.iter().map(|w| format!("{w:?}").to_lowercase()).collect::<Vec<_>>(),
            "seconds_per_run": plan.secs,
            "repetitions": plan.reps,
            "placements": plan.placements.iter().map(|p| json!({"name": p.name(),
                "iperf3_affinity": p.affinity(plan.cpus).map(|(c, s)| [c, s])})).collect::<Vec<_>>(),
            "nofile": m.nofile,
            "load_average_before": m.load,
            "targets": targets,
            "systems": self.systems.iter().map(|s| json!({"name": s.name, "label": s.label,
                "pid": s.pid, "not_run": s.failed})).collect::<Vec<_>>(),
            "throughput": w.throughput,
            "latency": w.latency,
            "connection_rate": w.rate,
            "scale": w.scale,
            "rootless_docker": w.docker,
            "udp": self.res.udp,
            "resources": resources,
            "forwarder_stats": self
                .res
                .fwd_stats
                .iter()
                .map(|(m, st)| (m.to_string(), st.clone()))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// The rootless Docker table: one row per system.
    fn render_docker(&self, md: &mut String, d: &super::docker::DockerResults) -> Result<()> {
        writeln!(md, "## Rootless Docker\n")?;
        if let Some(why) = &d.skipped {
            writeln!(md, "{}\n", cell(why))?;
            return Ok(());
        }
        writeln!(
            md,
            "One busybox container of rootless dockerd (run as user fwdtest, slirp4netns), \
             `docker run -p 127.0.0.1:P:80 -p 127.0.0.1:Q:7`, published by RootlessKit's \
             builtin port driver or by `forwarder attach-docker --mode ENGINE` (port driver \
             none; CAP_BPF + CAP_NET_ADMIN). Download: one HTTP GET of a {:.0} MiB file from \
             busybox httpd, Gbit/s; rate: connect, 1-byte request/response, close against an \
             echo server in the container. {} repetitions, the systems one after the other \
             (dockerd restarts between the two port drivers), medians (min-max).\n",
            d.download_bytes as f64 / (1 << 20) as f64,
            self.plan.reps
        )?;
        let rate_hdr = CLIENTS
            .iter()
            .map(|c| format!("conn/s, {c} client{}", if *c == 1 { "" } else { "s" }))
            .collect::<Vec<_>>();
        writeln!(
            md,
            "| system | download Gbit/s | x builtin | {} |",
            rate_hdr.join(" | ")
        )?;
        writeln!(md, "|---|---|---|{}", "---|".repeat(CLIENTS.len()))?;
        let builtin = d
            .rows
            .iter()
            .find(|r| r.name == "rootlesskit")
            .filter(|r| !r.gbit.is_empty())
            .map(|r| median(&r.gbit));
        for r in &d.rows {
            if r.gbit.is_empty() {
                let why = r.failed.as_deref().unwrap_or("no results");
                writeln!(
                    md,
                    "| {} | {} |{}",
                    r.label,
                    cell(why),
                    " |".repeat(CLIENTS.len() + 1)
                )?;
                continue;
            }
            let x = builtin.map_or_else(
                || "n/a".to_string(),
                |b| format!("{:.2}", median(&r.gbit) / b),
            );
            let rates = CLIENTS
                .iter()
                .map(|c| {
                    r.conn_per_s
                        .get(c)
                        .filter(|v| !v.is_empty())
                        .map_or_else(|| "n/a".to_string(), |v| spread(v, 0))
                })
                .collect::<Vec<_>>();
            writeln!(
                md,
                "| {} | {} | {x} | {} |",
                r.label,
                spread(&r.gbit, 2),
                rates.join(" | ")
            )?;
        }
        for r in d.rows.iter().filter(|r| !r.gbit.is_empty()) {
            if let Some(f) = &r.failed {
                writeln!(md, "\n- {}: {}", r.name, f.replace('\n', " "))?;
            }
        }
        writeln!(md)?;
        Ok(())
    }

    fn render_throughput(
        &self,
        md: &mut String,
        out: &mut serde_json::Map<String, Value>,
    ) -> Result<()> {
        let plan = self.plan;
        writeln!(md, "## Throughput\n")?;
        writeln!(
            md,
            "iperf3, {} s per run, {} repetitions after a 1-s unpinned warm-up of each system, \
             in {} placement(s) of iperf3's client and server (the forwarder is never pinned): \
             the first table is how users run it and the one the targets are judged on. \
             forward = the client (parent) sends, reverse = `-R`. Gbit/s is iperf3's received \
             rate; x direct is the median of the per-repetition ratios to direct.\n",
            plan.secs,
            plan.reps,
            plan.placements.len()
        )?;
        for &place in &plan.placements {
            let title = match place {
                Placement::Unpinned => "Unpinned (as users run it)",
                Placement::Split => "Client and server pinned to different CPUs",
                Placement::Same => "Client and server pinned to the same CPU",
            };
            writeln!(md, "### {title}\n\n{}.\n", place.describe(plan.cpus))?;
            for streams in STREAMS {
                self.render_thr_table(md, out, place, streams)?;
            }
        }
        self.render_thr_cpu(md, out)
    }

    /// Where the CPU went during the primary placement's throughput runs:
    /// machine CPU per GB, its kernel part, and each CPU's busy share.
    fn render_thr_cpu(
        &self,
        md: &mut String,
        out: &mut serde_json::Map<String, Value>,
    ) -> Result<()> {
        writeln!(
            md,
            "### CPU during the throughput runs\n\n\
             From /proc/stat around every run: busy time of all CPUs (user, system, irq, \
             softirq, steal; every process and kernel thread, iperf3 included) per GB \
             received, and of that the kernel part (system + irq + softirq, where the ebpf \
             engine's redirects and the loopback stack run); and each CPU's busy share during \
             the one-stream runs (medians). direct's row is the cost of iperf3 and loopback \
             TCP alone. Over the {} runs only.\n",
            self.plan.placements[0].name()
        )?;
        let primary = self.plan.placements[0];
        let ncpu = self
            .res
            .thr
            .values()
            .flat_map(|m| m.values())
            .flat_map(|v| v.iter())
            .map(|r| r.cpu.per_cpu_busy.len())
            .max()
            .unwrap_or(0);
        let cpus_hdr = (0..ncpu)
            .map(|c| format!("CPU{c}"))
            .collect::<Vec<_>>()
            .join(" / ");
        writeln!(
            md,
            "| system | machine CPU s per GB | of which kernel | busy {cpus_hdr}, 1 stream forward | busy {cpus_hdr}, 1 stream reverse |"
        )?;
        writeln!(md, "|---|---|---|---|---|")?;
        for sys in self.systems {
            let Some(m) = self.res.thr.get(&sys.name) else {
                continue;
            };
            let all: Vec<_> = m
                .iter()
                .filter(|(k, _)| k.0 == primary)
                .flat_map(|(_, v)| v)
                .collect();
            let gb: f64 = all.iter().map(|r| r.bytes).sum::<f64>() / 1e9;
            let busy: f64 = all.iter().map(|r| r.cpu.busy_s).sum();
            let kernel: f64 = all.iter().map(|r| r.cpu.kernel_s).sum();
            let per_cpu = |d: usize| per_cpu_busy(m.get(&(primary, 1, d)), ncpu);
            if gb > 0.0 {
                writeln!(
                    md,
                    "| {} | {:.3} | {:.3} | {} | {} |",
                    sys.label,
                    busy / gb,
                    kernel / gb,
                    per_cpu(0),
                    per_cpu(1)
                )?;
                out.entry(sys.name.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .map(|o| {
                        o.insert(
                            "machine_cpu".into(),
                            json!({"busy_s_per_gb": busy / gb, "kernel_s_per_gb": kernel / gb}),
                        )
                    });
            }
        }
        writeln!(md)?;
        Ok(())
    }

    /// One placement's table for one stream count, and its pairs.
    fn render_thr_table(
        &self,
        md: &mut String,
        out: &mut serde_json::Map<String, Value>,
        place: Placement,
        streams: u32,
    ) -> Result<()> {
        let pname = place.name();
        writeln!(
            md,
            "#### {pname}, {streams} stream{}\n",
            if streams > 1 { "s (`-P 4`)" } else { "" }
        )?;
        writeln!(
            md,
            "| system | forward Gbit/s | forward x direct | reverse Gbit/s | reverse x direct |"
        )?;
        writeln!(md, "|---|---|---|---|---|")?;
        for sys in self.systems {
            let row = self.render_thr_row(out, sys, place, streams)?;
            writeln!(md, "{row}")?;
        }
        let pairs = self.thr_pairs(out, place, streams);
        if !pairs.is_empty() {
            writeln!(md, "\nPair by pair: {}.", pairs.join("; "))?;
        }
        writeln!(md)?;
        Ok(())
    }

    /// One system's row of a throughput table (both directions, or why
    /// there are none), and its JSON under `out[system][placement]`.
    fn render_thr_row(
        &self,
        out: &mut serde_json::Map<String, Value>,
        sys: &System,
        place: Placement,
        streams: u32,
    ) -> Result<String> {
        let mut row = format!("| {} |", sys.label);
        let mut entry = serde_json::Map::new();
        let have = (0..2).all(|d| !self.gbits(&sys.name, (place, streams, d)).is_empty());
        if have {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                let g = self.gbits(&sys.name, (place, streams, d));
                let x = self.thr_ratio(&sys.name, "direct", (place, streams, d));
                write!(row, " {} | {x:.2} |", spread(&g, 1))?;
                let runs = &self.res.thr[&sys.name][&(place, streams, d)];
                entry.insert(
                    dir.to_string(),
                    json!({"gbit_per_s": g, "median": median(&g), "ratio_to_direct": x,
                           "runs": runs}),
                );
            }
        } else {
            let why = sys.failed.as_deref().unwrap_or("no results");
            write!(row, " {} | | | |", cell(why))?;
        }
        let sys_out = out
            .entry(sys.name.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut();
        if let Some(o) = sys_out {
            let p = o.entry(place.name()).or_insert_with(|| json!({}));
            if let Some(p) = p.as_object_mut() {
                p.insert(format!("streams_{streams}"), Value::Object(entry));
            }
        }
        Ok(row)
    }

    /// ebpf against splice and each peer, and splice against copy: the
    /// ratios where both ran, as text, and into `out["A_over_B"]`.
    fn thr_pairs(
        &self,
        out: &mut serde_json::Map<String, Value>,
        place: Placement,
        streams: u32,
    ) -> Vec<String> {
        let mut pairs = Vec::new();
        for (a, b) in [
            ("ebpf", "splice"),
            ("ebpf", "pasta"),
            ("ebpf", "rootlesskit"),
            ("ebpf", "socat"),
            ("splice", "copy"),
        ] {
            let f = self.thr_ratio(a, b, (place, streams, 0));
            let r = self.thr_ratio(a, b, (place, streams, 1));
            if f.is_finite() && r.is_finite() {
                pairs.push(format!("{a} / {b} {f:.2} forward, {r:.2} reverse"));
                let pair = out
                    .entry(format!("{a}_over_{b}"))
                    .or_insert_with(|| json!({}));
                if let Some(o) = pair.as_object_mut() {
                    let p = o.entry(place.name()).or_insert_with(|| json!({}));
                    if let Some(p) = p.as_object_mut() {
                        p.insert(
                            format!("streams_{streams}"),
                            json!({"forward": f, "reverse": r}),
                        );
                    }
                }
            }
        }
        pairs
    }

    fn render_latency(&self, md: &mut String) -> Result<Value> {
        writeln!(
            md,
            "## Request/response latency\n\n\
             One connection, TCP_NODELAY, a message of SIZE bytes echoed back, {} round trips \
             after 100 unrecorded, per repetition; the load generator is a single-threaded \
             tokio client (in the child for direct), the echo server `xtask bench-echo` in the \
             child (RootlessKit: in its own child). Microseconds: median (min-max) over the \
             repetitions of each run's percentile; max is the largest of all runs; \"- direct\" \
             is the median of per-repetition differences of p50.\n",
            self.plan.round_trips
        )?;
        writeln!(
            md,
            "| system | size | p50 us | p50 - direct us | p99 us | p99.9 us | max us |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        let mut out = serde_json::Map::new();
        for size in SIZES {
            let mut m = serde_json::Map::new();
            for sys in self.systems {
                let c = match with_runs(self.res.lat.get(&size).and_then(|m| m.get(&sys.name)), sys)
                {
                    Ok(c) => c,
                    Err(why) => {
                        writeln!(md, "| {} | {size} B | {} | | | | |", sys.label, cell(&why))?;
                        m.insert(sys.name.clone(), json!({"not_run": why}));
                        continue;
                    }
                };
                let p = |i: usize| self.lat(size, &sys.name, i);
                let direct = self.lat(size, "direct", 0);
                let diff = if direct.is_empty() {
                    f64::NAN
                } else {
                    difference(&p(0), &direct)
                };
                writeln!(
                    md,
                    "| {} | {size} B | {} | {diff:+.1} | {} | {} | {:.0} |",
                    sys.label,
                    spread(&p(0), 1),
                    spread(&p(1), 1),
                    spread(&p(2), 1),
                    min_max(&p(3)).1
                )?;
                m.insert(sys.name.clone(), json!({"runs": c.runs.iter().map(|l| json!({
                    "p50_us": l[0], "p99_us": l[1], "p999_us": l[2], "max_us": l[3]})).collect::<Vec<_>>(),
                    "p50_minus_direct_us": diff, "not_run": c.failed}));
            }
            out.insert(format!("{size}"), Value::Object(m));
        }
        writeln!(md)?;
        Ok(json!({"round_trips": self.plan.round_trips, "by_size_bytes": out}))
    }

    fn render_rate(&self, md: &mut String) -> Result<Value> {
        writeln!(
            md,
            "## Connection rate\n\n\
             Each client (a thread of its own, blocking sockets) in a loop for {} s per \
             repetition: connect, 1-byte request, 1-byte answer, the server closes, the \
             client closes. setup = connect() to the answer \
             byte. x RootlessKit, x pasta, x direct: median of per-repetition ratios. The \
             clients are at 127.0.0.1, an address the child has too, so no forwarder \
             preserves it, except in the rows \"client at 127.0.0.5\": auto mode's \
             forwarder again, with its clients at an address it preserves. socat: each \
             connection's EOF reaches the client only when the inner socat exits, 0.5 s after \
             the server closed (socat's default `-t 0.5`), which bounds its rate.\n",
            self.plan.rate_secs
        )?;
        writeln!(
            md,
            "| system | clients | conn/s | x RootlessKit | x pasta | x direct | p99 setup us | failed |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        let mut out = serde_json::Map::new();
        for clients in CLIENTS {
            let mut m = serde_json::Map::new();
            let rk = self.cps(clients, "rootlesskit");
            let pasta = self.cps(clients, "pasta");
            let direct = self.cps(clients, "direct");
            let x_of = |cps: &[f64], of: &[f64]| {
                if of.is_empty() || cps.is_empty() {
                    "n/a".to_string()
                } else {
                    format!("{:.2}", ratio(cps, of))
                }
            };
            for sys in self.systems.iter().chain(&self.res.rate_only) {
                let c = match with_runs(
                    self.res.rate.get(&clients).and_then(|m| m.get(&sys.name)),
                    sys,
                ) {
                    Ok(c) => c,
                    Err(why) => {
                        writeln!(
                            md,
                            "| {} | {clients} | {} | | | | | |",
                            sys.label,
                            cell(&why)
                        )?;
                        m.insert(sys.name.clone(), json!({"not_run": why}));
                        continue;
                    }
                };
                let cps = self.cps(clients, &sys.name);
                let (x, xp, xd) = (x_of(&cps, &rk), x_of(&cps, &pasta), x_of(&cps, &direct));
                let p99: Vec<f64> = c.runs.iter().map(|r| r.p99_setup_us).collect();
                let failed: u64 = c.runs.iter().map(|r| r.failed).sum();
                let f = match c.runs.iter().find_map(|r| r.first_error.clone()) {
                    Some(e) if failed > 0 => format!("{failed} (first: {})", e.replace('|', " ")),
                    _ => failed.to_string(),
                };
                writeln!(
                    md,
                    "| {} | {clients} | {} | {x} | {xp} | {xd} | {} | {f} |",
                    sys.label,
                    spread(&cps, 0),
                    spread(&p99, 0)
                )?;
                m.insert(
                    sys.name.clone(),
                    json!({"runs": c.runs, "not_run": c.failed}),
                );
            }
            out.insert(format!("{clients}"), Value::Object(m));
        }
        writeln!(md)?;
        Ok(json!({"seconds": self.plan.rate_secs, "by_clients": out}))
    }

    fn render_scale(&self, md: &mut String) -> Result<Value> {
        let plan = self.plan;
        writeln!(
            md,
            "## Scale: {} idle connections\n\n\
             {} repetition(s): open {} connections through the system, 64 being set up at a \
             time, each proven end to end by a 1-byte echo; hold them all, read the carrier's \
             RSS (VmRSS, the largest of the repetitions) and descriptors, close them all. A \
             forwarder must then report no active connection (\"drained\"). Runs after the \
             other workloads; peak RSS is VmHWM at the end of the whole run. RootlessKit: its \
             parent process; direct: no carrier.\n",
            plan.scale_conns, plan.scale_reps, plan.scale_conns
        )?;
        if let Some(note) = &plan.scale_note {
            writeln!(md, "Connections held: {note}.\n")?;
        }
        writeln!(
            md,
            "| system | time to open s | p99 setup us | RSS held MiB | peak RSS MiB | fds held | drained s |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        let mut out = serde_json::Map::new();
        for sys in self.systems {
            let c = self.res.scale.get(&sys.name);
            let c = match c {
                Some(c) if !c.runs.is_empty() && c.failed.is_none() => c,
                other => {
                    let why = other
                        .and_then(|c| c.failed.clone())
                        .or_else(|| sys.failed.clone())
                        .unwrap_or_else(|| "no results".into());
                    writeln!(md, "| {} | {} | | | | | |", sys.label, cell(&why))?;
                    out.insert(
                        sys.name.clone(),
                        json!({"not_run": why,
                        "runs": other.map(|c| &c.runs)}),
                    );
                    continue;
                }
            };
            let open: Vec<f64> = c.runs.iter().map(|r| r.open_secs).collect();
            let p99: Vec<f64> = c.runs.iter().map(|r| r.p99_setup_us).collect();
            let rss = c
                .runs
                .iter()
                .filter_map(|r| r.rss_mib)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
            let fds = c.runs.iter().filter_map(|r| r.fds).max();
            let drained: Vec<f64> = c.runs.iter().filter_map(|r| r.drained_secs).collect();
            let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"));
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                sys.label,
                spread(&open, 2),
                spread(&p99, 0),
                show(rss),
                show(self.res.peak_rss.get(&sys.name).copied()),
                fds.map_or_else(|| "n/a".to_string(), |f| f.to_string()),
                if drained.is_empty() {
                    "n/a".to_string()
                } else {
                    format!("{:.1}", min_max(&drained).1)
                }
            )?;
            out.insert(sys.name.clone(), json!({"runs": c.runs}));
        }
        writeln!(md)?;
        Ok(
            json!({"connections": plan.scale_conns, "parallel": super::SCALE_PARALLEL,
            "by_system": out}),
        )
    }

    fn render_resources(&self, md: &mut String) -> Result<Value> {
        writeln!(
            md,
            "## Resources of the process that carries the bytes\n\n\
             CPU: the process's utime+stime over the throughput runs (warm-ups included) per GB \
             iperf3 received through it. ebpf: the redirects run in softirq and kernel-worker \
             context, not charged to the forwarder, so this counts only its controller; the \
             machine-wide figures above count everything. RSS holding the idle connections: \
             VmRSS during the scale workload; peak RSS: VmHWM at the end of the run. socat starts processes per connection and is \
             not measured; RootlessKit: its parent process (slirp4netns not included).\n"
        )?;
        writeln!(
            md,
            "| system | GB moved | process CPU s per GB | RSS MiB holding idle connections | peak RSS MiB |"
        )?;
        writeln!(md, "|---|---|---|---|---|")?;
        let mut out = serde_json::Map::new();
        let show =
            |v: Option<f64>, p: usize| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.p$}"));
        for sys in self.systems.iter().filter(|s| s.name != "direct") {
            let gb = self.res.bytes.get(&sys.name).map(|b| b / 1e9);
            let cpu = self.res.cpu_per_gb.get(&sys.name).copied();
            let scale = self
                .res
                .scale
                .get(&sys.name)
                .and_then(|c| c.runs.iter().filter_map(|r| r.rss_mib).reduce(f64::max));
            let all = self.res.peak_rss.get(&sys.name).copied();
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                sys.label,
                show(gb, 2),
                show(cpu, 3),
                show(scale, 1),
                show(all, 1)
            )?;
            out.insert(
                sys.name.clone(),
                json!({"gb_moved": gb, "cpu_s_per_gb": cpu, "rss_mib_holding_idle": scale,
                       "peak_rss_mib": all, "pid": sys.pid}),
            );
        }
        Ok(Value::Object(out))
    }

    /// Bar charts: throughput (one and four streams), 1-byte latency.
    pub fn svg(&self) -> String {
        let thr = |streams: u32| -> Vec<(String, Vec<f64>)> {
            self.systems
                .iter()
                .filter_map(|s| {
                    let f = self.gbits(&s.name, (Self::PRIMARY, streams, 0));
                    let r = self.gbits(&s.name, (Self::PRIMARY, streams, 1));
                    (!f.is_empty() && !r.is_empty())
                        .then(|| (s.name.clone(), vec![median(&f), median(&r)]))
                })
                .collect()
        };
        let (one, four) = (thr(1), thr(4));
        let lat: Vec<(String, Vec<f64>)> = self
            .systems
            .iter()
            .filter_map(|s| {
                let p50 = self.lat(1, &s.name, 0);
                let p99 = self.lat(1, &s.name, 1);
                (!p50.is_empty()).then(|| (s.name.clone(), vec![median(&p50), median(&p99)]))
            })
            .collect();
        crate::chart::svg(&[
            crate::chart::Panel {
                title: "Throughput, iperf3 one stream, unpinned (Gbit/s, median)",
                series: &["forward", "reverse"],
                rows: &one,
            },
            crate::chart::Panel {
                title: "Throughput, iperf3 four streams, unpinned (Gbit/s, median)",
                series: &["forward", "reverse"],
                rows: &four,
            },
            crate::chart::Panel {
                title: "Ping-pong latency, 1 byte (microseconds, median of runs)",
                series: &["p50", "p99"],
                rows: &lat,
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cell, RateRun, ScaleRun, ThrRun};
    use super::*;

    fn system(name: &str, failed: Option<&str>) -> System {
        System {
            name: name.into(),
            label: format!("label {name}"),
            iperf_port: None,
            echo_port: None,
            pid: None,
            failed: failed.map(str::to_string),
        }
    }

    fn plan() -> Plan {
        Plan {
            reps: 2,
            secs: 1,
            round_trips: 10,
            rate_secs: 1,
            scale_conns: 100,
            scale_reps: 1,
            cpus: None,
            placements: vec![Placement::Unpinned],
            workloads: vec![
                Workload::Scale,
                Workload::Throughput,
                Workload::Latency,
                Workload::Rate,
                Workload::Docker,
            ],
            scale_note: None,
        }
    }

    /// Two repetitions per system: throughput `gbit` each way (one stream),
    /// p50 `p50` us, `cps` connections per second.
    fn results(rows: &[(&str, f64, f64, f64)]) -> Results {
        let mut res = Results::default();
        for &(name, gbit, p50, cps) in rows {
            let thr = res.thr.entry(name.into()).or_default();
            for d in 0..2 {
                thr.insert(
                    (Placement::Unpinned, 1, d),
                    (0..2)
                        .map(|_| ThrRun {
                            gbit,
                            bytes: 1e9,
                            cpu: Default::default(),
                        })
                        .collect(),
                );
            }
            let lat = Cell {
                runs: vec![[p50, 2.0 * p50, 3.0 * p50, 4.0 * p50]; 2],
                failed: None,
            };
            res.lat.entry(1).or_default().insert(name.into(), lat);
            let rate = Cell {
                runs: vec![
                    RateRun {
                        conn_per_s: cps,
                        p99_setup_us: 100.0,
                        failed: 0,
                        first_error: None,
                    };
                    2
                ],
                failed: None,
            };
            res.rate.entry(1).or_default().insert(name.into(), rate);
        }
        res
    }

    #[test]
    fn targets_are_judged_from_the_run() {
        let systems = [
            system("direct", None),
            system("ebpf", None),
            system("splice", None),
            system("auto", None),
            system("rootlesskit", None),
            system("pasta", None),
            system("socat", Some("socat exploded")),
        ];
        let mut res = results(&[
            ("direct", 30.0, 50.0, 6000.0),
            ("ebpf", 15.0, 55.0, 3000.0),
            ("splice", 20.0, 60.0, 4000.0),
            ("auto", 20.0, 60.0, 4000.0),
            ("rootlesskit", 5.0, 80.0, 1000.0),
            ("pasta", 10.0, 70.0, 2000.0),
        ]);
        res.scale.insert(
            "ebpf".into(),
            Cell {
                runs: vec![ScaleRun {
                    conns: 100,
                    open_secs: 0.1,
                    p99_setup_us: 10.0,
                    rss_mib: Some(20.0),
                    fds: Some(230),
                    drained_secs: Some(0.1),
                }],
                failed: None,
            },
        );
        res.peak_rss.insert("ebpf".into(), 40.0);
        let plan = plan();
        let report = Report {
            plan: &plan,
            systems: &systems,
            res: &res,
            machine: Machine {
                date: "2026-01-01 00:00:00 UTC".into(),
                kernel: "6.18.0".into(),
                iperf: "iperf 3.18".into(),
                ncpu: 2,
                command: "cargo xtask bench".into(),
                load: "0 0 0".into(),
                nofile: 1024,
            },
        };
        let verdict = |what: &str| {
            report
                .targets()
                .into_iter()
                .find(|t| t.what == what)
                .unwrap_or_else(|| panic!("no target {what}"))
                .met
        };
        let thr = "ebpf bulk throughput forward, one stream, unpinned, x";
        assert_eq!(verdict(&format!("{thr} splice")), Some(false)); // 0.75
        assert_eq!(verdict(&format!("{thr} pasta")), Some(true)); // 1.5
                                                                  // No four-stream runs: not measured rather than met.
        assert_eq!(
            verdict("ebpf bulk throughput forward, 4 streams, unpinned, x pasta"),
            None
        );
        assert_eq!(
            verdict(
                "auto bulk throughput forward, one stream, unpinned, x the best engine (best: splice)"
            ),
            Some(true)
        );
        assert_eq!(
            verdict("ebpf p50 latency 1 B, minus splice's (required)"),
            Some(true)
        ); // -5
        assert_eq!(verdict("ebpf p50 latency 1 B, minus direct's"), Some(true)); // +5
        assert_eq!(verdict("ebpf p99.9 latency 1 B, minus pasta's"), Some(true)); // -45
        assert_eq!(verdict("ebpf p50 latency 1024 B, minus direct's"), None);
        // auto is 60 us where ebpf does 55: 0.92 of the best.
        assert_eq!(
            verdict("auto p50 latency 1 B, the best engine's / auto's (best: ebpf)"),
            Some(false)
        );
        assert_eq!(
            verdict("auto connection rate, 1 client(s), x splice"),
            Some(true)
        );
        assert_eq!(
            verdict("auto connection rate, 1 client(s), x RootlessKit"),
            Some(true)
        );
        assert_eq!(
            verdict("auto connection rate, 1 client(s), x the best engine (best: splice)"),
            Some(true)
        );
        // No CPU time recorded: not measured.
        assert_eq!(
            verdict("ebpf machine CPU per GB, unpinned, x splice's"),
            None
        );
        let rss = "ebpf forwarder RSS while holding 100 idle connections";
        assert_eq!(verdict(rss), Some(true)); // 21 MB
        let peak = "ebpf forwarder peak RSS over the whole run, which includes holding 100 idle connections";
        assert_eq!(verdict(peak), Some(false)); // 42 MB

        let (md, json) = report.render().expect("render");
        assert!(
            md.contains(&format!("| {thr} splice | 0.75 x | >= 1 x | **missed** |")),
            "{md}"
        );
        assert!(
            md.contains("| label socat | not run: socat exploded |"),
            "{md}"
        );
        assert_eq!(json["systems"][6]["not_run"], "socat exploded");
        assert_eq!(
            json["throughput"]["ebpf"]["unpinned"]["streams_1"]["forward"]["ratio_to_direct"],
            0.5
        );
        assert!(md.contains("### Unpinned (as users run it)"), "{md}");
    }
}
