//! `labctl record-boot`: a VM's exits across a whole boot, sampled by L1 while L2 boots,
//! split into phases by the guest's console, checked against the guest's own reading, and
//! written out as CSV, YAML and a plot.
//!
//! Clock: L1's monotonic clock, zero when L1 started L2's QEMU. L1 timestamps every sample
//! and every console line it relays on that one clock, so phases and samples line up.
//! Phases start at the first console line that marks them:
//!
//! | phase     | from                                                 | marker |
//! |-----------|------------------------------------------------------|--------|
//! | firmware  | KVM created the VM (its debugfs directory appeared)   | |
//! | kernel    | the kernel's banner                                   | `Linux version ` |
//! | userspace | the kernel starts the first process                   | `Run /init as init process` (or `/sbin/init`, …) |
//! | idle      | boot done: the guest's CPUID reading was taken         | checkpoint `boot-done` |
//! | shutdown  | the guest idled for `--idle` seconds                   | checkpoint `idle-end` |
//! | (end)     | the VM's QEMU exited                                  | |
//!
//! The guest reads CPUID 0x4FFFFFFF between two checkpoints at which L1 samples the same
//! counters: `exits(boot-done-before) < EAX <= exits(boot-done)` (the reading counts its
//! own exit; every other exit between the two checkpoints is the guest reporting on its
//! serial port).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::ValueEnum;
use exitlab_proto::job::{DiskBoot, Job, Level, Recording, Step, VmJob};
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{
    apply_reason_updates, sample_stats, Msg, ReasonTotals, Stream, STAT_EXITS, STAT_EXIT_CYCLES,
};
use exitlab_proto::reasons::sdm_name;
use exitlab_proto::vm::{self, l1, Machine};
use serde::Serialize;

use crate::debian;
use crate::error::setup;
use crate::images::UserFile;
use crate::plot;
use crate::progress;
use crate::scenario::{self, Lab};
use crate::verify::{self, Check};

pub const SCHEMA: &str = "kvm-exit-lab/record-boot/v1";
/// The checkpoints around the guest's reading (see `guest/src/bin/boot-done.rs`).
pub const BEFORE: &str = "boot-done-before";
pub const AFTER: &str = "boot-done";
/// The checkpoint after the idle period, where the shutdown starts.
pub const IDLE_END: &str = "idle-end";
/// Longest idle period accepted, in seconds.
pub const MAX_IDLE_S: u32 = 3600;
/// Largest sampling interval accepted, in ms: beyond it a boot is a handful of points.
pub const MAX_INTERVAL_MS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    /// The lab's own L2: the lab kernel, an initramfs, the lab's init.
    Minimal,
    /// Debian (debootstrap), Debian's kernel and initramfs, systemd, root on virtio.
    Debian,
}

impl Guest {
    pub fn name(self) -> &'static str {
        match self {
            Guest::Minimal => "minimal",
            Guest::Debian => "debian",
        }
    }
}

pub struct RecordRequest {
    pub guest: Guest,
    pub interval_ms: u32,
    /// Seconds the booted guest idles before it shuts down.
    pub idle_s: u32,
    pub out: Option<PathBuf>,
}

/// Checks the output directory can be written, before anything boots.
pub fn prepare_out(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| {
        setup(format!(
            "cannot create the output directory {}: {e}; pass --out with a writable directory",
            dir.display()
        ))
    })?;
    let probe = dir.join(".labctl-write-test");
    fs::write(&probe, b"").map_err(|e| {
        setup(format!(
            "the output directory {} is not writable: {e}; pass --out with a writable directory",
            dir.display()
        ))
    })?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// One reading of the VM's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Point {
    pub t_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub stats: BTreeMap<String, u64>,
    /// The VM's exits and cycles by SDM reason (empty on a kernel without them).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: ReasonTotals,
}

impl Point {
    pub fn get(&self, name: &str) -> u64 {
        self.stats.get(name).copied().unwrap_or(0)
    }

    /// The sum of the per-reason exit counts; `None` without per-reason counters.
    pub fn reason_exits(&self) -> Option<u64> {
        (!self.reasons.is_empty()).then(|| self.reasons.values().map(|c| c.exits).sum())
    }
}

/// Everything a recording collected from the messages.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub created_us: Option<u64>,
    pub exited_us: Option<u64>,
    /// Samples, periodic and checkpoint, in time order.
    pub points: Vec<Point>,
    /// L2 console lines with the time L1 read them.
    pub console: Vec<(u64, String)>,
    /// The guest's own reading, as it printed it.
    pub reading_line: Option<String>,
}

impl Recorded {
    pub fn from_msgs<'a>(msgs: impl IntoIterator<Item = &'a Msg>) -> Self {
        let mut r = Recorded::default();
        let mut stdout = String::new();
        // Each sample carries the reasons that changed since the one read before it, and
        // samples from L1's two sampling threads can arrive out of order: the table is
        // rebuilt in the order of the readings, which is their time order.
        let mut updates: Vec<(u64, &[[u64; 3]])> = Vec::new();
        for m in msgs {
            match m {
                Msg::VmCreated { created_us } => r.created_us = Some(*created_us),
                Msg::VmExited { t_us, .. } => r.exited_us = *t_us,
                // A sample without the exit count was taken while the VM was being
                // destroyed (its statistics files go one by one): not a reading.
                Msg::Sample { t_us, tag, v, r: u } => {
                    let stats = sample_stats(v);
                    if stats.contains_key(STAT_EXITS) {
                        r.points.push(Point {
                            t_us: *t_us,
                            tag: tag.clone(),
                            stats,
                            reasons: ReasonTotals::new(),
                        });
                        updates.push((*t_us, u));
                    }
                }
                Msg::Console {
                    level: Level::L2,
                    line,
                    t_us: Some(t),
                } => r.console.push((*t, line.clone())),
                Msg::Output {
                    level: Level::L2,
                    stream: Stream::Stdout,
                    text,
                } => stdout.push_str(text),
                _ => {}
            }
        }
        r.points.sort_by_key(|p| p.t_us);
        updates.sort_by_key(|(t, _)| *t);
        let mut table = ReasonTotals::new();
        for (p, (_, u)) in r.points.iter_mut().zip(updates) {
            apply_reason_updates(&mut table, u);
            p.reasons = table.clone();
        }
        r.reading_line = stdout
            .lines()
            .find(|l| l.parse::<ExitStats>().is_ok())
            .map(String::from);
        r
    }

    pub fn tagged(&self, tag: &str) -> Option<&Point> {
        self.points.iter().find(|p| p.tag.as_deref() == Some(tag))
    }

    fn first_line(&self, pred: impl Fn(&str) -> bool) -> Option<u64> {
        self.console.iter().find(|(_, l)| pred(l)).map(|(t, _)| *t)
    }

    /// The counters as they were at `t_us`: the last sample at or before it (the first
    /// sample if `t_us` is before every sample).
    pub fn at(&self, t_us: u64) -> Option<&Point> {
        let i = self.points.partition_point(|p| p.t_us <= t_us);
        self.points.get(i.saturating_sub(1))
    }
}

/// Times of the boot's events, in µs on the recording's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Events {
    pub vm_created_us: Option<u64>,
    pub kernel_us: Option<u64>,
    pub userspace_us: Option<u64>,
    /// Debian: systemd reached multi-user.target (login prompts are up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_ready_us: Option<u64>,
    pub boot_done_us: Option<u64>,
    pub idle_end_us: Option<u64>,
    pub vm_exited_us: Option<u64>,
}

pub const KERNEL_MARKER: &str = "Linux version ";

fn is_first_process(line: &str) -> bool {
    line.contains("Run ") && line.contains(" as init process")
}

/// systemd's status line for multi-user.target (Debian): login prompts are up.
fn is_login_ready(line: &str) -> bool {
    line.contains("Reached target") && line.contains("Multi-User System")
}

pub fn events(r: &Recorded) -> Events {
    Events {
        vm_created_us: r.created_us,
        kernel_us: r.first_line(|l| l.contains(KERNEL_MARKER)),
        userspace_us: r.first_line(is_first_process),
        login_ready_us: r.first_line(is_login_ready),
        boot_done_us: r.tagged(AFTER).map(|p| p.t_us),
        idle_end_us: r.tagged(IDLE_END).map(|p| p.t_us),
        vm_exited_us: r.exited_us,
    }
}

/// One phase of the boot and what happened in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub start_s: f64,
    pub end_s: f64,
    pub exits: u64,
    pub exit_cycles: u64,
    pub exits_per_s: f64,
    /// Mean exit rate over the phase's busiest sampling interval.
    pub peak_exits_per_s: f64,
    /// KVM's per-kind counters over the phase (they overlap; see SAMPLED_STATS).
    pub kinds: BTreeMap<String, u64>,
    /// The phase's exits by SDM reason, most exits first: they sum to `exits` (but for
    /// the exits in flight at the phase's two samples).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<PhaseReason>,
}

/// One exit reason's part of a phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseReason {
    pub reason: u32,
    pub name: &'static str,
    pub exits: u64,
    pub cycles: u64,
    /// Of the phase's exits, in %.
    pub exits_pct: f64,
    /// Of the phase's exit cycles, in %.
    pub cycles_pct: f64,
}

/// The name of an SDM reason, as the tables print it.
pub fn reason_name(reason: u32) -> &'static str {
    sdm_name(reason).unwrap_or("(undefined)")
}

/// What happened between two samples, by reason, most exits first (reasons with none
/// left out).
pub fn reasons_between(a: &Point, z: &Point) -> Vec<PhaseReason> {
    let pct = |x: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            100.0 * x as f64 / of as f64
        }
    };
    let mut v: Vec<(u32, u64, u64)> = z
        .reasons
        .iter()
        .map(|(r, c)| {
            let before = a.reasons.get(r).copied().unwrap_or_default();
            (
                *r,
                c.exits.saturating_sub(before.exits),
                c.cycles.saturating_sub(before.cycles),
            )
        })
        .filter(|(_, e, _)| *e > 0)
        .collect();
    let (exits, cycles) = v
        .iter()
        .fold((0, 0), |(e, c), (_, de, dc)| (e + de, c + dc));
    v.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    v.into_iter()
        .map(|(reason, e, c)| PhaseReason {
            reason,
            name: reason_name(reason),
            exits: e,
            cycles: c,
            exits_pct: pct(e, exits),
            cycles_pct: pct(c, cycles),
        })
        .collect()
}

pub const PHASES: [&str; 5] = ["firmware", "kernel", "userspace", "idle", "shutdown"];

/// The phases' boundaries: each phase's start, and the end; `None` where a marker is
/// missing (a boot that did not get that far).
pub fn boundaries(e: &Events) -> [Option<u64>; 6] {
    [
        e.vm_created_us,
        e.kernel_us,
        e.userspace_us,
        e.boot_done_us,
        e.idle_end_us,
        e.vm_exited_us,
    ]
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

pub fn phases(r: &Recorded, e: &Events) -> Vec<Phase> {
    let b = boundaries(e);
    let rates = rates(r);
    let mut out = Vec::new();
    for (i, name) in PHASES.iter().enumerate() {
        let (Some(start), Some(end)) = (b[i], b[i + 1].or(r.points.last().map(|p| p.t_us))) else {
            continue;
        };
        let (Some(a), Some(z)) = (r.at(start), r.at(end)) else {
            continue;
        };
        let dur = secs(end.saturating_sub(start));
        let exits = z.get(STAT_EXITS).saturating_sub(a.get(STAT_EXITS));
        let mut kinds = BTreeMap::new();
        for k in z.stats.keys() {
            if k != STAT_EXITS && k != STAT_EXIT_CYCLES {
                kinds.insert(k.clone(), z.get(k).saturating_sub(a.get(k)));
            }
        }
        let peak = r
            .points
            .iter()
            .zip(&rates)
            .filter(|(p, _)| p.t_us > start && p.t_us <= end)
            .filter_map(|(_, rate)| *rate)
            .fold(0.0, f64::max);
        out.push(Phase {
            name,
            start_s: secs(start),
            end_s: secs(end),
            exits,
            exit_cycles: z
                .get(STAT_EXIT_CYCLES)
                .saturating_sub(a.get(STAT_EXIT_CYCLES)),
            exits_per_s: if dur > 0.0 { exits as f64 / dur } else { 0.0 },
            peak_exits_per_s: peak,
            kinds,
            reasons: reasons_between(a, z),
        });
    }
    out
}

/// Exit rate (exits/s) over the interval that ends at each sample; `None` for the first
/// sample (and for one taken at the same time as the one before).
pub fn rates(r: &Recorded) -> Vec<Option<f64>> {
    let mut out = vec![None; r.points.len()];
    for (i, w) in r.points.windows(2).enumerate() {
        if w[1].t_us > w[0].t_us {
            let d = w[1].get(STAT_EXITS).saturating_sub(w[0].get(STAT_EXITS));
            out[i + 1] = Some(d as f64 / secs(w[1].t_us - w[0].t_us));
        }
    }
    out
}

/// The series' checks: monotonic counters, phases in order, the guest's reading inside
/// its checkpoints, and the sampling interval kept.
pub fn checks(r: &Recorded, e: &Events, interval_ms: u32) -> Vec<Check> {
    let mut c = Vec::new();
    let n = r.points.len();
    c.push(Check::new(
        "sampled",
        n >= 2,
        format!("{n} samples of the VM's statistics"),
    ));
    let backwards: Vec<String> = r
        .points
        .windows(2)
        .flat_map(|w| {
            w[0].stats
                .keys()
                .map(|k| (k, w[1].stats.get(k).copied().unwrap_or(0)))
                .filter(|(k, v)| *v < w[0].get(k))
                .map(|(k, v)| format!("{k} {} -> {v} at {:.3} s", w[0].get(k), secs(w[1].t_us)))
                .collect::<Vec<_>>()
        })
        .collect();
    c.push(Check::new(
        "monotonic",
        backwards.is_empty() && n >= 2,
        if backwards.is_empty() {
            "every counter only grows from sample to sample".to_string()
        } else {
            format!("counters went backwards: {}", backwards.join("; "))
        },
    ));
    let b = boundaries(e);
    let missing: Vec<&str> = [
        "VM created",
        "kernel banner",
        "first process",
        "boot done",
        "idle end",
        "VM exited",
    ]
    .iter()
    .zip(b)
    .filter(|(_, t)| t.is_none())
    .map(|(n, _)| *n)
    .collect();
    let times: Vec<u64> = b.iter().flatten().copied().collect();
    let ordered = times.windows(2).all(|w| w[0] <= w[1]);
    c.push(Check::new(
        "phases",
        missing.is_empty() && ordered,
        if !missing.is_empty() {
            format!("missing: {}", missing.join(", "))
        } else if !ordered {
            format!("out of order: {times:?} µs")
        } else {
            format!(
                "firmware, kernel, userspace, idle, shutdown in order: {}",
                times
                    .iter()
                    .map(|t| format!("{:.2}", secs(*t)))
                    .collect::<Vec<_>>()
                    .join(" < ")
            )
        },
    ));
    let reading = r
        .reading_line
        .as_deref()
        .and_then(|l| l.parse::<ExitStats>().ok());
    let (before, after) = (r.tagged(BEFORE), r.tagged(AFTER));
    c.push(match (reading, before, after) {
        (Some(g), Some(s1), Some(s2)) => {
            let (e1, e2) = (s1.get(STAT_EXITS), s2.get(STAT_EXITS));
            let (c1, c2) = (s1.get(STAT_EXIT_CYCLES), s2.get(STAT_EXIT_CYCLES));
            let ok = e1 < u64::from(g.exits) && u64::from(g.exits) <= e2 && c1 <= g.cycles && g.cycles <= c2;
            Check::new(
                "guest-reading",
                ok,
                format!(
                    "exits {e1} < {} <= {e2} and cycles {c1} <= {} <= {c2} (checkpoints {BEFORE}, {AFTER})",
                    g.exits, g.cycles
                ),
            )
        }
        _ => Check::new(
            "guest-reading",
            false,
            format!(
                "missing: {}",
                [
                    (reading.is_none(), "the guest's reading"),
                    (before.is_none(), BEFORE),
                    (after.is_none(), AFTER),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, w)| *w)
                .collect::<Vec<_>>()
                .join(", ")
            ),
        ),
    });
    // Periodic samples only: checkpoints come in between.
    let periodic: Vec<u64> = r
        .points
        .iter()
        .filter(|p| p.tag.is_none())
        .map(|p| p.t_us)
        .collect();
    c.push(interval_check(&periodic, interval_ms));
    c
}

/// `per-reason-sum`: at every sample the exits by reason add up to the exit count. KVM
/// counts an exit in its reason right after the hardware VM-exit, before `stat.exits`, and
/// L1 reads the exit count before the reasons: so each sample's sum is at least its exit
/// count, and at most the next sample's plus one exit in flight per vCPU.
pub fn reason_sum_check(r: &Recorded, vcpus: u32) -> Check {
    let name = "per-reason-sum";
    if r.points.iter().all(|p| p.reasons.is_empty()) {
        return Check::new(
            name,
            false,
            "no sample has per-reason counters (the VM's debugfs exit_reasons file): is L1 running the lab's patched KVM?",
        );
    }
    // KVM lists only the reasons that occurred: before the first exit the table is empty.
    let missing = r
        .points
        .iter()
        .filter(|p| p.reasons.is_empty() && p.get(STAT_EXITS) > 0)
        .count();
    let bad: Vec<String> = r
        .points
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let sum = p.reason_exits().unwrap_or(0);
            let lo = p.get(STAT_EXITS);
            let next = r.points.get(i + 1).map(|n| n.get(STAT_EXITS));
            let hi = next.map(|n| n + u64::from(vcpus));
            (sum < lo || hi.is_some_and(|hi| sum > hi)).then(|| {
                format!(
                    "at {:.3} s: {sum} by reason, exits {lo}{}",
                    secs(p.t_us),
                    next.map_or(String::new(), |n| format!(", next {n}"))
                )
            })
        })
        .collect();
    let last = r.points.last();
    Check::new(
        name,
        bad.is_empty() && missing == 0,
        if missing > 0 {
            format!(
                "{missing} of {} samples with exits have no per-reason counters",
                r.points.len()
            )
        } else if !bad.is_empty() {
            format!(
                "{} of {} samples off: {}",
                bad.len(),
                r.points.len(),
                bad.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
            )
        } else {
            format!(
                "{} samples: exits <= sum by reason <= next sample's exits + {vcpus} (in flight); last: {} by reason, {} exits",
                r.points.len(),
                last.and_then(Point::reason_exits).unwrap_or(0),
                last.map_or(0, |p| p.get(STAT_EXITS))
            )
        },
    )
}

/// The sampler keeps its schedule: the median gap is the interval (within 10 %), and at
/// least 99 % of gaps are under 1.5 intervals. L1 is itself emulated, so now and then it
/// misses a tick (a gap of two intervals); those are counted, not failed.
pub fn interval_check(times_us: &[u64], interval_ms: u32) -> Check {
    let want = f64::from(interval_ms) * 1000.0;
    let mut gaps: Vec<f64> = times_us.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    gaps.sort_by(f64::total_cmp);
    let Some(&median) = gaps.get(gaps.len() / 2) else {
        return Check::new("interval", false, "fewer than two periodic samples");
    };
    let late = gaps.iter().filter(|g| **g > 1.5 * want).count();
    let worst = gaps.last().copied().unwrap_or(0.0);
    let ok = (median - want).abs() <= 0.1 * want && late * 100 <= gaps.len();
    Check::new(
        "interval",
        ok,
        format!(
            "median gap {:.1} ms (goal {interval_ms} ms +-10%), {late} of {} gaps over 1.5 intervals (goal <= 1%), largest {:.1} ms",
            median / 1000.0,
            gaps.len(),
            worst / 1000.0
        ),
    )
}

#[derive(Debug, Serialize)]
struct Summary<'a> {
    schema: &'static str,
    guest: Guest,
    l2_kernel: Option<String>,
    vcpus: u32,
    memory_mib: u32,
    interval_ms: u32,
    idle_s: u32,
    /// False if the boot did not reach its end (timeout, crash): the series is partial.
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    samples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_bytes: Option<SampleBytes>,
    events_s: BTreeMap<&'static str, f64>,
    totals: Totals,
    phases: &'a [Phase],
    guest_reading: Option<ExitStats>,
    kvm_exit_tracepoint: &'static str,
    checks: &'a [Check],
    files: BTreeMap<&'static str, PathBuf>,
    logs: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Totals {
    exits: u64,
    exit_cycles: u64,
    seconds: f64,
    /// The whole recording by SDM reason, most exits first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<PhaseReason>,
}

/// What the samples cost the protocol link (L1's ttyS1, shared with the console relay).
#[derive(Debug, Serialize)]
pub struct SampleBytes {
    pub mean: f64,
    pub max: usize,
    /// Mean bytes per second over the recording.
    pub per_s: f64,
}

/// Bytes per sample message on the link, from the messages as they were sent.
pub fn sample_bytes(msgs: &[Msg], seconds: f64) -> Option<SampleBytes> {
    let sizes: Vec<usize> = msgs
        .iter()
        .filter(|m| matches!(m, Msg::Sample { .. }))
        .map(|m| m.to_line().len())
        .collect();
    let total: usize = sizes.iter().sum();
    (!sizes.is_empty()).then(|| SampleBytes {
        mean: total as f64 / sizes.len() as f64,
        max: sizes.iter().copied().max().unwrap_or(0),
        per_s: if seconds > 0.0 {
            total as f64 / seconds
        } else {
            0.0
        },
    })
}

/// A reason's CSV column stem: its SDM name in lower case (`cpuid`, `ept_violation`).
pub fn reason_column(reason: u32) -> String {
    match sdm_name(reason) {
        Some(n) => n.to_lowercase(),
        None => format!("reason_{reason}"),
    }
}

/// The series as CSV: one row per sample; after KVM's per-kind counters, the exits and
/// the cycles of each reason the recording saw (`<reason>_exits`, `<reason>_cycles`,
/// cumulative like the other counters).
pub fn csv(r: &Recorded, e: &Events) -> String {
    let reasons: Vec<u32> = r
        .points
        .iter()
        .flat_map(|p| p.reasons.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let reason_cols: Vec<String> = reasons
        .iter()
        .flat_map(|r| {
            let c = reason_column(*r);
            [format!("{c}_exits"), format!("{c}_cycles")]
        })
        .collect();
    let kinds: Vec<String> = r
        .points
        .iter()
        .flat_map(|p| p.stats.keys().cloned())
        .filter(|k| k != STAT_EXITS && k != STAT_EXIT_CYCLES)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let b = boundaries(e);
    let phase_at = |t: u64| {
        PHASES
            .iter()
            .enumerate()
            .rev()
            .find(|(i, _)| b[*i].is_some_and(|s| t >= s))
            .map_or("", |(_, n)| n)
    };
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let header = ["t_s", "phase", "tag", "exits", "exit_cycles", "exits_per_s"]
        .into_iter()
        .map(String::from)
        .chain(kinds.iter().cloned())
        .chain(reason_cols);
    w.write_record(header).expect("writing to memory");
    for (p, rate) in r.points.iter().zip(rates(r)) {
        let rate = rate.map_or(String::new(), |x| format!("{x:.0}"));
        let mut row = vec![
            format!("{:.6}", secs(p.t_us)),
            phase_at(p.t_us).to_string(),
            p.tag.clone().unwrap_or_default(),
            p.get(STAT_EXITS).to_string(),
            p.get(STAT_EXIT_CYCLES).to_string(),
            rate,
        ];
        row.extend(kinds.iter().map(|k| p.get(k).to_string()));
        for reason in &reasons {
            let c = p.reasons.get(reason).copied().unwrap_or_default();
            row.extend([c.exits.to_string(), c.cycles.to_string()]);
        }
        w.write_record(&row).expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("writing to memory")).expect("the fields are UTF-8")
}

fn l2_job(lab: &Lab, req: &RecordRequest, disk_boot: Option<DiskBoot>) -> Job {
    let steps = match req.guest {
        Guest::Minimal => vec![
            Step::Checkpoint { tag: BEFORE.into() },
            Step::Run {
                argv: vec![format!("{}/test_assignment2", l1::GUEST_BIN_DIR)],
            },
            Step::Checkpoint { tag: AFTER.into() },
            Step::Idle {
                ms: u64::from(req.idle_s) * 1000,
            },
            Step::Checkpoint {
                tag: IDLE_END.into(),
            },
        ],
        Guest::Debian => vec![],
    };
    Job {
        level: Level::L1,
        steps: vec![Step::Vm(VmJob {
            vcpus: lab.cfg.l2_vcpus,
            memory_mib: lab.cfg.l2_memory_mib,
            files: vec![],
            kernel_args: "earlyprintk=serial,ttyS0,115200".into(),
            job: Job {
                level: Level::L2,
                steps,
            },
            disk_boot,
            record: Some(Recording {
                interval_ms: req.interval_ms,
            }),
            // A recorded guest is a PC with UARTs, whatever this says.
            machine: Machine::Pc,
        })],
    }
}

/// L1's tick for the Debian guest: periodic (no high-resolution timers, no dynamic tick),
/// so that L1's APIC timer fires every tick by itself. QEMU 7.2's emulated SVM can lose the
/// request to deliver L1's timer interrupt (`do_vmexit()` clears a bit of the vCPU's
/// `interrupt_request` without the BQL, racing the APIC's; fixed upstream after QEMU 10.1),
/// and L1's one-shot timer is then never re-armed until another interrupt comes: L1 stood
/// still for up to 1.2 s in about one Debian boot in ten, whose 10 000-15 000 I/O exits a
/// second make the race likely. With a periodic tick a lost request costs one tick (4 ms).
/// README, "Reliability".
const DEBIAN_L1_TICK: &str = "highres=off nohz=off";

/// `labctl record-boot`.
pub fn record_boot(lab: &Lab, req: &RecordRequest) -> Result<i32> {
    if req.interval_ms == 0 || req.interval_ms > MAX_INTERVAL_MS {
        return Err(setup(format!(
            "--interval {} ms: give a sampling interval from 1 to {MAX_INTERVAL_MS} ms (default 20)",
            req.interval_ms
        )));
    }
    let out = req.out.clone().unwrap_or_else(|| {
        lab.cfg.build_dir.join("record-boot").join(format!(
            "{}-{}vcpu",
            req.guest.name(),
            lab.cfg.l2_vcpus
        ))
    });
    if req.idle_s > MAX_IDLE_S {
        return Err(setup(format!(
            "--idle {} s: give 0 to {MAX_IDLE_S} seconds",
            req.idle_s
        )));
    }
    prepare_out(&out)?;
    let mut p = lab.build()?;
    if req.guest == Guest::Debian {
        p.l1_cmdline_base = scenario::l1_cmdline(&p.l1_cmdline_base, DEBIAN_L1_TICK);
    }
    let (job, files, extra) = match req.guest {
        Guest::Minimal => (l2_job(lab, req, None), vec![], vec![]),
        Guest::Debian => {
            let boot_done = lab
                .artifacts
                .guest_dir
                .clone()
                .unwrap_or_else(|| lab.cfg.build_dir.join("guest"))
                .join("boot-done");
            let img = debian::image(&lab.cfg.build_dir, &boot_done)?;
            let files = vec![
                UserFile::named(&img.kernel, "vmlinuz")?,
                UserFile::named(&img.initrd, "initrd.img")?,
            ];
            let disk = DiskBoot {
                kernel: "vmlinuz".into(),
                initrd: "initrd.img".into(),
                disk: "/dev/vda".into(),
                cmdline: format!("{} exitlab.idle_ms={}", debian::CMDLINE, req.idle_s * 1000),
            };
            let extra = vec![
                "-drive".to_string(),
                format!(
                    "file={},if=virtio,format=raw,snapshot=on",
                    vm::esc(&img.disk.display().to_string())
                ),
            ];
            (l2_job(lab, req, Some(disk)), files, extra)
        }
    };
    progress::note(
        "record",
        format!(
            "{} guest, {} vCPU(s), {} MiB, a sample every {} ms, {} s idle after boot; output: {}",
            req.guest.name(),
            lab.cfg.l2_vcpus,
            lab.cfg.l2_memory_mib,
            req.interval_ms,
            req.idle_s,
            out.display()
        ),
    );
    let mut msgs: Vec<Msg> = Vec::new();
    let run = lab.run_with(&p, "record-boot", &job, &files, extra, |m| {
        if let Msg::Console {
            level: Level::L2,
            line,
            t_us: Some(t),
        } = m
        {
            if line.contains(KERNEL_MARKER) || is_first_process(line) || is_login_ready(line) {
                progress::note("record", format!("{:>8.2} s  {}", secs(*t), line.trim()));
            }
        }
        msgs.push(m.clone());
    });
    let (run, error) = match run {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let r = Recorded::from_msgs(&msgs);
    let e = events(&r);
    let phases = phases(&r, &e);
    let mut checks = checks(&r, &e, req.interval_ms);
    if let Some(run) = &run {
        checks.insert(0, run.ran_check());
        checks.push(run.no_stalls());
    }
    checks.push(reason_sum_check(&r, lab.cfg.l2_vcpus));
    if let Some(c) = idle_check(&phases, req.idle_s) {
        checks.push(c);
    }
    let files_out = BTreeMap::from([
        ("csv", out.join("samples.csv")),
        ("yaml", out.join("summary.yaml")),
        ("svg", out.join("exits.svg")),
        ("png", out.join("exits.png")),
    ]);
    fs::write(&files_out["csv"], csv(&r, &e))?;
    let title = format!(
        "VM exits during a full boot: {} guest, {} vCPU{}",
        req.guest.name(),
        lab.cfg.l2_vcpus,
        if lab.cfg.l2_vcpus == 1 { "" } else { "s" }
    );
    fs::write(&files_out["svg"], plot::svg(&title, &r, &e, &phases))?;
    let png = plot::png(&files_out["svg"], &files_out["png"]);
    let complete = error.is_none() && e.boot_done_us.is_some() && e.vm_exited_us.is_some();
    let last = r.points.last();
    let seconds = match (e.vm_created_us, last) {
        (Some(c), Some(l)) => secs(l.t_us.saturating_sub(c)),
        _ => 0.0,
    };
    let summary = Summary {
        schema: SCHEMA,
        guest: req.guest,
        l2_kernel: run.as_ref().and_then(|r| r.kernel(Level::L2)),
        vcpus: lab.cfg.l2_vcpus,
        memory_mib: lab.cfg.l2_memory_mib,
        interval_ms: req.interval_ms,
        idle_s: req.idle_s,
        complete,
        error: error.as_ref().map(|e| format!("{e:#}")),
        samples: r.points.len(),
        events_s: [
            ("vm_created", e.vm_created_us),
            ("kernel", e.kernel_us),
            ("userspace", e.userspace_us),
            ("login_ready", e.login_ready_us),
            ("boot_done", e.boot_done_us),
            ("idle_end", e.idle_end_us),
            ("vm_exited", e.vm_exited_us),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, secs(v))))
        .collect(),
        totals: Totals {
            exits: last.map_or(0, |p| p.get(STAT_EXITS)),
            exit_cycles: last.map_or(0, |p| p.get(STAT_EXIT_CYCLES)),
            seconds,
            reasons: last.map_or(vec![], |z| reasons_between(&Point::default(), z)),
        },
        sample_bytes: sample_bytes(&msgs, seconds),
        phases: &phases,
        guest_reading: r.reading_line.as_deref().and_then(|l| l.parse().ok()),
        kvm_exit_tracepoint: "not recorded: the lab's L1 kernel is built without tracing (CONFIG_FTRACE), to keep it small and its exit path unchanged; exit kinds come from KVM's own per-kind counters",
        checks: &checks,
        files: files_out.clone(),
        logs: run.as_ref().map(|r| r.dir.clone()),
    };
    fs::write(&files_out["yaml"], serde_yaml_ng::to_string(&summary)?)?;
    print_table(&summary, &phases, &checks, &files_out);
    if let Some(err) = error {
        eprintln!(
            "record-boot: the boot did not finish; the partial series ({} samples) is kept, marked incomplete, in {}",
            r.points.len(),
            out.display()
        );
        return Err(err);
    }
    if let Err(e) = png {
        return Err(setup(format!(
            "{e:#}\n  (the CSV, YAML and SVG are written in {})",
            out.display()
        )));
    }
    if !complete {
        // The boot ran, but the guest stopped before the end (its QEMU exited or the
        // protocol went quiet): a crashed VM, not a failed check on a finished boot.
        let why = run
            .as_ref()
            .and_then(|r| r.l2_vanished())
            .unwrap_or_else(|| "it never reported boot done".into());
        eprintln!(
            "record-boot: the guest stopped before the end of its boot ({why}); the partial series ({} samples) is kept, marked incomplete, in {}",
            r.points.len(),
            out.display()
        );
        return Ok(crate::error::code::VM_CRASHED.into());
    }
    Ok(if verify::all_ok(&checks) {
        0
    } else {
        crate::error::code::SCENARIO_FAILED.into()
    })
}

/// `idle-as-asked`: the booted guest idled as long as asked, within 10 % (at least
/// 0.1 s): a guest whose timers fire late sleeps on, and its idle figures mean nothing.
pub fn idle_check(phases: &[Phase], asked_s: u32) -> Option<Check> {
    let p = phases.iter().find(|p| p.name == "idle")?;
    let (secs, asked) = (p.end_s - p.start_s, f64::from(asked_s));
    let slack = (asked * 0.1).max(0.1);
    Some(Check::new(
        "idle-as-asked",
        secs >= asked && secs <= asked + slack,
        format!(
            "idle phase {secs:.2} s for the {asked_s} s asked (goal: within {slack:.2} s over)"
        ),
    ))
}

/// How many reasons the per-phase tables list.
const TOP_REASONS: usize = 4;

/// Per phase, the top reasons by exits and by cycles, with their shares of the phase.
fn print_reason_tables(phases: &[Phase], total: &[PhaseReason]) {
    if total.is_empty() {
        return;
    }
    let top = |rs: &[PhaseReason], by_cycles: bool| {
        let mut v: Vec<&PhaseReason> = rs.iter().collect();
        if by_cycles {
            v.sort_by_key(|r| std::cmp::Reverse(r.cycles));
        }
        v.iter()
            .take(TOP_REASONS)
            .map(|r| {
                let pct = if by_cycles { r.cycles_pct } else { r.exits_pct };
                format!("{} {pct:.1}%", r.name)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("top {TOP_REASONS} exit reasons of each phase (share of the phase's exits; of its exit cycles):");
    let rows = phases
        .iter()
        .map(|p| (p.name, p.reasons.as_slice()))
        .chain([("total", total)]);
    for (name, rs) in rows {
        println!("{name:<10} by exits:  {}", top(rs, false));
        println!("{:<10} by cycles: {}", "", top(rs, true));
    }
}

fn print_table(
    s: &Summary,
    phases: &[Phase],
    checks: &[Check],
    files: &BTreeMap<&'static str, PathBuf>,
) {
    println!(
        "{:<10} {:>8} {:>8} {:>10} {:>14} {:>11} {:>11}",
        "phase", "start s", "end s", "exits", "exit cycles", "exits/s", "peak/s"
    );
    for p in phases {
        println!(
            "{:<10} {:>8.2} {:>8.2} {:>10} {:>14} {:>11.0} {:>11.0}",
            p.name, p.start_s, p.end_s, p.exits, p.exit_cycles, p.exits_per_s, p.peak_exits_per_s
        );
    }
    println!(
        "{:<10} {:>8} {:>8.2} {:>10} {:>14}",
        "total", "", s.totals.seconds, s.totals.exits, s.totals.exit_cycles
    );
    print_reason_tables(phases, &s.totals.reasons);
    if let Some(b) = &s.sample_bytes {
        println!(
            "samples on L1's protocol link: {:.0} bytes each on average (largest {}), {:.0} bytes/s",
            b.mean, b.max, b.per_s
        );
    }
    if let Some(g) = &s.guest_reading {
        println!("guest at boot done: {g}");
    }
    for c in checks {
        c.print();
    }
    for (k, v) in files {
        println!("{k:<5} {}", v.display());
    }
    if !s.complete {
        println!("INCOMPLETE: the boot did not reach its end; the series is partial");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_must_last_what_was_asked() {
        let phase = |name, start_s, end_s| Phase {
            name,
            start_s,
            end_s,
            exits: 0,
            exit_cycles: 0,
            exits_per_s: 0.0,
            peak_exits_per_s: 0.0,
            kinds: BTreeMap::new(),
            reasons: vec![],
        };
        let ok = |start, end, asked| {
            idle_check(
                &[phase("kernel", 0.0, 1.0), phase("idle", start, end)],
                asked,
            )
            .unwrap()
            .ok
        };
        assert!(ok(6.65, 11.70, 5));
        assert!(!ok(6.65, 45.0, 5), "a guest that slept on");
        assert!(!ok(6.0, 10.0, 5), "a short idle");
        assert!(ok(2.0, 3.08, 1));
        assert!(idle_check(&[phase("kernel", 0.0, 1.0)], 5).is_none());
    }

    fn point(t_ms: u64, exits: u64, tag: Option<&str>) -> Msg {
        Msg::Sample {
            t_us: t_ms * 1000,
            tag: tag.map(String::from),
            v: exitlab_proto::msg::sample_values(
                &[
                    (STAT_EXITS.to_string(), exits),
                    (STAT_EXIT_CYCLES.to_string(), exits * 100),
                    ("io_exits".to_string(), exits / 2),
                ]
                .into(),
            ),
            // A quarter CPUID, the rest I/O; every sample carries both (unchanged ones too,
            // which is harmless).
            r: vec![
                [10, exits / 4, exits * 25],
                [30, exits - exits / 4, exits * 75],
            ],
        }
    }

    fn console(t_ms: u64, line: &str) -> Msg {
        Msg::Console {
            level: Level::L2,
            line: line.into(),
            t_us: Some(t_ms * 1000),
        }
    }

    fn boot() -> Vec<Msg> {
        vec![
            Msg::VmCreated { created_us: 10_000 },
            point(10, 0, None),
            point(60, 100, None),
            console(70, "Linux version 6.12.117"),
            point(110, 1000, None),
            point(160, 3000, None),
            console(170, "Run /init as init process"),
            point(210, 4000, None),
            point(215, 4100, Some(BEFORE)),
            Msg::Output {
                level: Level::L2,
                stream: Stream::Stdout,
                text: "CPUID(0x4FFFFFFF), exits=4101, cycles spent in exit=410050\n".into(),
            },
            point(220, 4200, Some(AFTER)),
            point(240, 4250, None),
            point(250, 4260, Some(IDLE_END)),
            point(260, 4300, None),
            Msg::VmExited {
                status: exitlab_proto::msg::Status::Code(0),
                t_us: Some(280_000),
            },
        ]
    }

    #[test]
    fn phases_split_the_series_at_the_markers() {
        let r = Recorded::from_msgs(&boot());
        let e = events(&r);
        assert_eq!(e.kernel_us, Some(70_000));
        assert_eq!(e.userspace_us, Some(170_000));
        assert_eq!(e.boot_done_us, Some(220_000));
        let ph = phases(&r, &e);
        let names: Vec<_> = ph.iter().map(|p| p.name).collect();
        assert_eq!(names, PHASES);
        // Values at a boundary are the last sample at or before it.
        assert_eq!(ph[0].exits, 100); // 0 at 10 ms .. 100 at 60 ms
        assert_eq!(ph[1].exits, 2900); // 100 .. 3000 at 160 ms
        assert_eq!(ph[2].exits, 1200); // 3000 .. 4200 at 220 ms
        assert_eq!(ph[3].exits, 60); // 4200 .. 4260 at 250 ms
        assert_eq!(ph[4].exits, 40);
        assert_eq!(ph[1].kinds["io_exits"], 1450);
        assert!((ph[1].peak_exits_per_s - 40_000.0).abs() < 1e-6);
        let total: u64 = ph.iter().map(|p| p.exits).sum();
        assert_eq!(total, 4300);
    }

    #[test]
    fn a_good_series_passes_every_check() {
        let r = Recorded::from_msgs(&boot());
        let c = checks(&r, &events(&r), 50);
        assert!(verify::all_ok(&c), "{c:#?}");
        let c = reason_sum_check(&r, 1);
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn phases_by_reason_sum_to_the_phase_and_sort_by_exits() {
        let r = Recorded::from_msgs(&boot());
        let ph = phases(&r, &events(&r));
        for p in &ph {
            let sum: u64 = p.reasons.iter().map(|r| r.exits).sum();
            assert_eq!(sum, p.exits, "{p:?}");
        }
        // kernel: 100 -> 3000 exits: CPUID 25 -> 750, I/O 75 -> 2250.
        let k = &ph[1].reasons;
        assert_eq!(
            (k[0].name, k[0].exits, k[0].cycles),
            ("IO_INSTRUCTION", 2175, 217_500)
        );
        assert_eq!((k[1].name, k[1].exits), ("CPUID", 725));
        assert!((k[0].exits_pct - 75.0).abs() < 0.1 && (k[1].cycles_pct - 25.0).abs() < 0.1);
        let csv = csv(&r, &events(&r));
        let head = csv.lines().next().unwrap();
        assert!(
            head.ends_with(",cpuid_exits,cpuid_cycles,io_instruction_exits,io_instruction_cycles"),
            "{head}"
        );
        assert!(
            csv.lines().nth(2).unwrap().ends_with(",25,2500,75,7500"),
            "{csv}"
        );
    }

    #[test]
    fn reasons_are_rebuilt_in_time_order_from_what_changed() {
        let s = |t_ms: u64, exits: u64, r: Vec<[u64; 3]>| Msg::Sample {
            t_us: t_ms * 1000,
            tag: None,
            v: exitlab_proto::msg::sample_values(&[(STAT_EXITS.to_string(), exits)].into()),
            r,
        };
        // The checkpoint thread's sample (read second) arrives before the periodic one.
        // KVM lists no reason before the VM's first exit.
        let m = [
            s(5, 0, vec![]),
            s(10, 3, vec![[10, 1, 10], [30, 2, 20]]),
            s(30, 6, vec![[30, 5, 50]]),
            s(20, 4, vec![[10, 2, 15]]),
        ];
        let r = Recorded::from_msgs(&m);
        let t: Vec<(u64, u64)> = r.points[1..]
            .iter()
            .map(|p| (p.reasons[&10].exits, p.reasons[&30].exits))
            .collect();
        assert_eq!(t, vec![(1, 2), (2, 2), (2, 5)]);
        assert!(reason_sum_check(&r, 1).ok);
        // Exits but no reasons: the per-reason file went missing.
        let m = [s(10, 3, vec![[10, 1, 10], [30, 2, 20]]), s(20, 4, vec![])];
        let mut r = Recorded::from_msgs(&m);
        r.points[1].reasons.clear();
        let c = reason_sum_check(&r, 1);
        assert!(
            !c.ok && c.detail.contains("1 of 2 samples with exits"),
            "{c:?}"
        );
        // A sum below its sample's exit count (an exit counted only in stat.exits) fails.
        let m = [s(10, 3, vec![[10, 1, 10], [30, 1, 20]]), s(20, 3, vec![])];
        let c = reason_sum_check(&Recorded::from_msgs(&m), 1);
        assert!(!c.ok && c.detail.contains("2 by reason, exits 3"), "{c:?}");
        // Above the next sample's count plus one in flight per vCPU.
        let m = [s(10, 3, vec![[10, 3, 10], [30, 3, 20]]), s(20, 4, vec![])];
        assert!(!reason_sum_check(&Recorded::from_msgs(&m), 1).ok);
        assert!(reason_sum_check(&Recorded::from_msgs(&m), 2).ok);
        // No per-reason counters at all: not the lab's KVM.
        let m = [s(10, 3, vec![]), s(20, 4, vec![])];
        let c = reason_sum_check(&Recorded::from_msgs(&m), 1);
        assert!(!c.ok && c.detail.contains("patched KVM"), "{c:?}");
    }

    #[test]
    fn bad_series_fail_with_reasons() {
        // A counter going backwards.
        let mut m = boot();
        m.insert(5, point(120, 900, None));
        let r = Recorded::from_msgs(&m);
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "monotonic" && !c.ok));
        // A reading outside its checkpoints.
        let m: Vec<Msg> = boot()
            .into_iter()
            .map(|m| match m {
                Msg::Output { level, stream, .. } => Msg::Output {
                    level,
                    stream,
                    text: "CPUID(0x4FFFFFFF), exits=4100, cycles spent in exit=410050\n".into(),
                },
                m => m,
            })
            .collect();
        let r = Recorded::from_msgs(&m);
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "guest-reading" && !c.ok));
        // A boot that never got to userspace: phases missing, the rest still sliced.
        let m: Vec<Msg> = boot().into_iter().take(6).collect();
        let r = Recorded::from_msgs(&m);
        let e = events(&r);
        let c = checks(&r, &e, 50);
        let phases_check = c.iter().find(|c| c.name == "phases").unwrap();
        assert!(!phases_check.ok);
        assert!(phases_check.detail.contains("first process"));
        assert_eq!(phases(&r, &e).len(), 2);
        // A sample of a VM being destroyed (no exit count) is not a reading.
        let mut m = boot();
        m.push(Msg::Sample {
            t_us: 290_000,
            tag: None,
            v: exitlab_proto::msg::sample_values(&[("io_exits".to_string(), 1)].into()),
            r: vec![],
        });
        let r = Recorded::from_msgs(&m);
        assert_eq!(r.points.last().unwrap().get(STAT_EXITS), 4300);
        // A counter that vanishes from one sample to the next is flagged.
        let mut r = Recorded::from_msgs(&boot());
        r.points[3].stats.remove("io_exits");
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "monotonic" && !c.ok));
        // A sampler off its schedule.
        let r = Recorded::from_msgs(&boot());
        let c = checks(&r, &events(&r), 20);
        assert!(c.iter().any(|c| c.name == "interval" && !c.ok));
    }

    #[test]
    fn the_interval_check_counts_missed_ticks_and_fails_a_drifting_sampler() {
        let steady: Vec<u64> = (0..200).map(|i| i * 20_000).collect();
        assert!(interval_check(&steady, 20).ok);
        // One missed tick in 200: counted, not failed.
        let missed: Vec<u64> = steady.iter().copied().filter(|t| *t != 2_000_000).collect();
        let c = interval_check(&missed, 20);
        assert!(c.ok && c.detail.contains("1 of 198"), "{}", c.detail);
        // Every fifth tick missed: fails.
        let bad: Vec<u64> = steady
            .iter()
            .copied()
            .filter(|t| t % 100_000 != 0)
            .collect();
        assert!(!interval_check(&bad, 20).ok);
        // Sampling at 30 ms when 20 was asked: fails.
        let slow: Vec<u64> = (0..100).map(|i| i * 30_000).collect();
        assert!(!interval_check(&slow, 20).ok);
        assert!(!interval_check(&[5], 20).ok);
    }

    #[test]
    fn csv_has_a_row_per_sample_with_phase_and_rate() {
        let r = Recorded::from_msgs(&boot());
        let text = csv(&r, &events(&r));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "t_s,phase,tag,exits,exit_cycles,exits_per_s,io_exits,cpuid_exits,cpuid_cycles,io_instruction_exits,io_instruction_cycles"
        );
        assert_eq!(lines.len(), 1 + r.points.len());
        assert_eq!(lines[1], "0.010000,firmware,,0,0,,0,0,0,0,0");
        assert_eq!(
            lines[3],
            "0.110000,kernel,,1000,100000,18000,500,250,25000,750,75000"
        );
        assert!(lines[7].starts_with("0.220000,idle,boot-done,4200,"));
        // A tag with a comma or a quote is quoted, and reads back whole.
        let mut r = r;
        r.points[0].tag = Some("a,\"b\"".into());
        let text = csv(&r, &events(&r));
        assert!(
            text.lines().nth(1).unwrap().contains(",\"a,\"\"b\"\"\","),
            "{text}"
        );
        let mut rd = ::csv::Reader::from_reader(text.as_bytes());
        let first = rd.records().next().unwrap().unwrap();
        assert_eq!(&first[2], "a,\"b\"");
        assert_eq!(first.len(), lines[0].split(',').count());
    }

    #[test]
    fn unwritable_output_is_refused() {
        let e = prepare_out(Path::new("/proc/no-such-dir/out")).unwrap_err();
        assert!(format!("{e}").contains("--out"), "{e}");
    }
}
