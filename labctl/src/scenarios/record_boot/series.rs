//! The recorded series: the samples, the boot's events read off the console, its phases
//! and the exits of each phase by reason. A model with no I/O: checks, CSV, tables and
//! the plot all read it.

use std::collections::BTreeMap;

use exitlab_proto::job::Level;
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{
    apply_reason_updates, sample_stats, Msg, ReasonTotals, Stream, STAT_EXITS, STAT_EXIT_CYCLES,
};
use exitlab_proto::reasons::sdm_name;
use serde::Serialize;

/// The checkpoints around the guest's reading (see `guest/src/bin/boot-done.rs`).
pub const BEFORE: &str = "boot-done-before";
pub const AFTER: &str = "boot-done";
/// The checkpoint after the idle period, where the shutdown starts.
pub const IDLE_END: &str = "idle-end";

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

/// A console line that marks one of the boot's events (shown as it happens).
pub fn marks_an_event(line: &str) -> bool {
    line.contains(KERNEL_MARKER) || is_first_process(line) || is_login_ready(line)
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

pub fn secs(us: u64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::record_boot::testdata::boot;

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
}
