//! Stage 6 of the pipeline, verification: named checks on what the guest read and what
//! KVM's own statistics say.

pub mod selftest;

use std::collections::BTreeMap;

use exitlab_proto::leaf::{ExitStats, SDM_REASON_CPUID};
use exitlab_proto::msg::{
    stat_sdm_reason_exits, stat_slot_sum, VmStats, STAT_EXITS, STAT_EXIT_CYCLES,
    STAT_REASON_CYCLES, STAT_REASON_EXITS,
};
use exitlab_proto::reasons::{self, ReasonAnswer, ReasonLine};
use exitlab_proto::stress::StressReport;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Prints checks one per line, `check <name> ok|FAIL  <detail>`, names padded to `width`.
pub fn print_checks(checks: &[Check], width: usize) {
    for c in checks {
        c.print_padded(width);
    }
}

impl Check {
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }

    /// One line: `check <name> ok|FAIL  <detail>`.
    pub fn print(&self) {
        self.print_padded(20);
    }

    fn print_padded(&self, width: usize) {
        println!(
            "check {:<width$} {}  {}",
            self.name,
            if self.ok { "ok  " } else { "FAIL" },
            self.detail
        );
    }
}

pub fn all_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
}

/// What a guest kernel prints when it stalled: its timers did not fire, a CPU made no
/// progress, or the time between two readings of its clock stretched to seconds. Each is
/// a lab that did not work as it should, whatever the scenario's own checks say.
pub const STALL_SIGNS: &[&str] = &[
    "detected stalls on CPUs",
    "self-detected stall on CPU",
    "kthread timer wakeup didn't happen",
    "kthread starved for",
    "watchdog: BUG: soft lockup",
    "BUG: workqueue lockup",
    "blocked for more than",
    "Long readout interval, skipping watchdog check",
];

/// The console lines that show a stall, at most `max` of them.
pub fn stall_lines(console: &str, max: usize) -> Vec<String> {
    console
        .lines()
        .filter(|l| STALL_SIGNS.iter().any(|s| l.contains(s)))
        .take(max)
        .map(|l| l.trim().to_string())
        .collect()
}

/// The stall lines of several console logs, each prefixed with whose console it is.
pub fn stalls_in(consoles: &[(&str, &std::path::Path)]) -> Vec<String> {
    let mut found = Vec::new();
    for (who, path) in consoles {
        let text = std::fs::read(path).unwrap_or_default();
        for l in stall_lines(&String::from_utf8_lossy(&text), 3) {
            found.push(format!("{who}: {l}"));
        }
    }
    found
}

/// `no-stalls`: neither L1's nor L2's console shows a stall.
pub fn no_stalls(consoles: &[(&str, &std::path::Path)]) -> Check {
    let found = stalls_in(consoles);
    Check::new(
        "no-stalls",
        found.is_empty(),
        if found.is_empty() {
            "no RCU stall, lost timer wake-up, soft lockup or stretched clock read in L1's or L2's console".to_string()
        } else {
            format!(
                "the guest stalled (a lab that stalls is broken, see docs/measurements.md, \"Reliability\"): {}",
                found.join(" | ")
            )
        },
    )
}

/// The VM totals KVM reports, as the leaf would: exits mod 2^32, cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostTotals {
    pub exits: u64,
    pub cycles: u64,
}

pub fn host_totals(vm: &VmStats) -> Option<HostTotals> {
    Some(HostTotals {
        exits: vm.total(STAT_EXITS)?,
        cycles: vm.total(STAT_EXIT_CYCLES)?,
    })
}

/// `per-vcpu-reason-sums`: at each checkpoint (`(tag, stats)`), every vCPU's per-slot
/// exits add up to its `exits` and its per-slot cycles to its `exit_cycles`, exactly: QEMU
/// reads a vCPU's binary statistics on that vCPU's thread, between two KVM_RUNs, where no
/// exit is half-counted (the series' invariant, with accounting on).
pub fn vcpu_reason_sums(checkpoints: &[(&str, Option<&VmStats>)]) -> Check {
    let name = "per-vcpu-reason-sums";
    let (ex, cy) = (
        stat_slot_sum(STAT_REASON_EXITS),
        stat_slot_sum(STAT_REASON_CYCLES),
    );
    let mut bad = Vec::new();
    let mut seen = 0;
    for (tag, stats) in checkpoints {
        let Some(stats) = stats else {
            bad.push(format!("{tag}: L1 reported no statistics"));
            continue;
        };
        if stats.vcpus.is_empty() {
            bad.push(format!("{tag}: no per-vCPU statistics"));
        }
        for v in &stats.vcpus {
            let get = |n: &str| v.stats.get(n).copied();
            match (get(&ex), get(STAT_EXITS), get(&cy), get(STAT_EXIT_CYCLES)) {
                (Some(se), Some(e), Some(sc), Some(c)) => {
                    seen += 1;
                    if se != e || sc != c {
                        bad.push(format!(
                            "{tag} vCPU {}: {se} exits by reason vs {e}, {sc} cycles by reason vs {c}",
                            v.id
                        ));
                    }
                }
                _ => bad.push(format!(
                    "{tag} vCPU {}: no {STAT_REASON_EXITS}/{STAT_REASON_CYCLES} arrays in KVM's binary statistics (is KVM patched?)",
                    v.id
                )),
            }
        }
    }
    Check::new(
        name,
        bad.is_empty(),
        if bad.is_empty() {
            format!(
                "{seen} vCPU readings at {}: per-reason exits = exits and per-reason cycles = exit_cycles, exactly",
                checkpoints.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
            )
        } else {
            bad.join("; ")
        },
    )
}

/// `a` is at or before `b` on the 2^32 circle (within half of it).
fn exits_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < (1 << 31)
}

/// Checks for `labctl lab`: two readings of `test_assignment2`, each followed by a
/// checkpoint at which L1 read the VM's statistics (`after1`, `after2`).
///
/// Relations, each exact in its direction: a reading counts its own CPUID exit but not its
/// cycles, so `r1 <= S1` (exits) and `r1.cycles < S1.cycles`; after S1 was taken, L2 had to
/// take at least one exit to learn it may continue, so `S1 < r2` for both; and `r2 <= S2`.
pub fn lab_checks(
    lines: &[String],
    readings: &[ExitStats],
    after1: Option<&VmStats>,
    after2: Option<&VmStats>,
) -> Vec<Check> {
    let mut c = Vec::new();
    let format_ok = lines.len() == 2 && readings.len() == 2;
    c.push(Check::new(
        "format",
        format_ok,
        if format_ok {
            "two lines, each exactly `CPUID(0x4FFFFFFF), exits=<n>, cycles spent in exit=<n>`"
                .to_string()
        } else {
            format!("expected two sample-format lines, got {lines:?}")
        },
    ));
    if !format_ok {
        return c;
    }
    let (r1, r2) = (readings[0], readings[1]);
    c.push(Check::new(
        "nonzero",
        r1.exits > 0 && r1.cycles > 0 && r2.exits > 0 && r2.cycles > 0,
        format!(
            "exits {} and {}, cycles {} and {} (all zero: the accounting is off, the leaves are not enabled for the VM (kvm.exit_stats_leaves=1 or KVM_CAP_X86_EXIT_STATS), or KVM is not patched)",
            r1.exits, r2.exits, r1.cycles, r2.cycles
        ),
    ));
    let grew = r1.exits_until(&r2);
    c.push(Check::new(
        "growing",
        grew > 0 && grew < (1 << 31) && r2.cycles > r1.cycles,
        format!(
            "+{grew} exits, +{} cycles between the two readings",
            r2.cycles.wrapping_sub(r1.cycles) as i64
        ),
    ));
    match (after1.and_then(host_totals), after2.and_then(host_totals)) {
        (Some(s1), Some(s2)) => {
            let (e1, e2) = (s1.exits as u32, s2.exits as u32);
            let ok = exits_le(r1.exits, e1)
                && r1.cycles < s1.cycles
                && exits_le(e1.wrapping_add(1), r2.exits)
                && s1.cycles < r2.cycles
                && exits_le(r2.exits, e2)
                && r2.cycles < s2.cycles;
            c.push(Check::new(
                "matches-kvm-stats",
                ok,
                format!(
                    "KVM stats (sum over vCPUs): exits {} then {}, exit_cycles {} then {}; wanted r1 <= S1 < r2 <= S2 for exits and r1 < S1 < r2 < S2 for cycles",
                    s1.exits, s2.exits, s1.cycles, s2.cycles
                ),
            ));
        }
        _ => c.push(Check::new(
            "matches-kvm-stats",
            false,
            "L1 did not report the VM's `exits` and `exit_cycles` statistics (is the kernel patched?)",
        )),
    }
    c
}

/// CPUIDs `test_assignment3` executes before it reads the CPUID reason in a full walk:
/// the vendor (leaf 0), the total (0x4FFFFFFF) and reasons 0 through 10, each one exit.
pub const CPUIDS_BEFORE_CPUID_REASON: u32 = 2 + SDM_REASON_CPUID + 1;

/// Checks for the per-reason part of `labctl lab`: `test_assignment3 CPUID` printed
/// `first`, then the full walk printed `walk`; L1 read the VM's statistics before the two
/// (`before`) and after them (`after`).
///
/// Relations: a walk reads each reason at a different moment, but every count only grows
/// and at any one moment the per-reason counts sum to the total, so the walk's sum lies
/// between the totals read before and after it. The CPUID reason grew between the two
/// programs by at least the CPUIDs the walk executed before reading it.
pub fn reason_checks(
    first: &str,
    walk: &str,
    before: Option<&VmStats>,
    after: Option<&VmStats>,
) -> Vec<Check> {
    let mut c = Vec::new();
    let parse =
        |out: &str| -> Result<Vec<ReasonLine>, String> { out.lines().map(str::parse).collect() };
    let (first, walk) = match (parse(first), parse(walk)) {
        (Ok(f), Ok(w)) => (f, w),
        (Err(e), _) | (_, Err(e)) => {
            c.push(Check::new("per-reason-table", false, e));
            return c;
        }
    };
    let numbers: Vec<u32> = walk.iter().map(|l| l.reason).collect();
    let undefined: Vec<u32> = walk
        .iter()
        .filter(|l| l.answer == ReasonAnswer::Undefined)
        .map(|l| l.reason)
        .collect();
    let table_ok = numbers == (0..=reasons::SDM_LAST).collect::<Vec<_>>()
        && undefined == [35, 38, 42, 71]
        && walk
            .iter()
            .all(|l| l.name.as_deref() == reasons::sdm_name(l.reason));
    c.push(Check::new(
        "per-reason-table",
        table_ok,
        format!(
            "{} lines for reasons 0..={}, undefined (EDX=0xFFFFFFFF): {undefined:?}; wanted every SDM reason once, in order, named, and exactly 35, 38, 42, 71 undefined",
            walk.len(),
            reasons::SDM_LAST
        ),
    ));
    let exits = |l: &ReasonLine| match l.answer {
        ReasonAnswer::Stats(s) => u64::from(s.exits),
        ReasonAnswer::Undefined => 0,
    };
    let sum: u64 = walk.iter().map(exits).sum();
    match (
        before.and_then(|s| s.total(STAT_EXITS)),
        after.and_then(|s| s.total(STAT_EXITS)),
    ) {
        (Some(s1), Some(s2)) => c.push(Check::new(
            "per-reason-sum",
            s1 <= sum && sum <= s2,
            format!("the walk's per-reason exits sum to {sum}; KVM's total was {s1} before the programs and {s2} after: wanted {s1} <= {sum} <= {s2}"),
        )),
        _ => c.push(Check::new(
            "per-reason-sum",
            false,
            "L1 did not report the VM's `exits` around the walk",
        )),
    }
    // Each reason against KVM's own per-reason counters (debugfs `exit_reasons`, summed by
    // SDM reason) read before and after the programs: K_before <= walk <= K_after.
    match (before, after) {
        (Some(b), Some(a)) => {
            let kvm = |s: &VmStats, r: u32| {
                s.vm.get(&stat_sdm_reason_exits(r)).copied().unwrap_or(0) as u32
            };
            let off: Vec<String> = walk
                .iter()
                .filter_map(|l| match l.answer {
                    ReasonAnswer::Stats(s) => {
                        let (k0, k1) = (kvm(b, l.reason), kvm(a, l.reason));
                        (!(exits_le(k0, s.exits) && exits_le(s.exits, k1)))
                            .then(|| format!("{}: {k0} <= {} <= {k1}?", l.reason, s.exits))
                    }
                    ReasonAnswer::Undefined => None,
                })
                .collect();
            let known = a.vm.keys().any(|k| k.starts_with("exit_reasons_sdm_"));
            c.push(Check::new(
                "per-reason-matches-kvm",
                known && off.is_empty(),
                if !known {
                    "L1 read no per-reason counters (the VM's debugfs exit_reasons file)".to_string()
                } else if off.is_empty() {
                    "every reason's count lies between KVM's per-reason counters read before and after the walk".to_string()
                } else {
                    format!("outside KVM's per-reason counters: {}", off.join("; "))
                },
            ));
        }
        _ => c.push(Check::new(
            "per-reason-matches-kvm",
            false,
            "L1 did not report the VM's statistics around the walk",
        )),
    }
    let cpuid = |lines: &[ReasonLine]| {
        lines
            .iter()
            .find(|l| l.reason == SDM_REASON_CPUID)
            .map(exits)
    };
    match (cpuid(&first), cpuid(&walk)) {
        (Some(a), Some(b)) => c.push(Check::new(
            "per-reason-cpuid",
            b >= a + u64::from(CPUIDS_BEFORE_CPUID_REASON),
            format!(
                "CPUID's exits {a} then {b} (+{}); the walk executed {CPUIDS_BEFORE_CPUID_REASON} CPUIDs before reading it",
                b.saturating_sub(a)
            ),
        )),
        _ => c.push(Check::new(
            "per-reason-cpuid",
            false,
            "no CPUID line (reason 10) in both outputs",
        )),
    }
    c
}

/// Figures of one stress run, for the table and the results file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StressFigures {
    pub vcpus: u32,
    pub threads: u32,
    pub iterations: u64,
    /// CPUIDs executed: threads × iterations.
    pub cpuids: u64,
    /// Exits between the guest's two readings.
    pub exits: u64,
    /// Exits beyond one per CPUID (timer ticks, IPIs, the readings themselves, …).
    pub excess_exits: i64,
    pub cycles: u64,
    pub cycles_per_exit: f64,
    pub exits_per_s: f64,
    pub exits_per_s_per_vcpu: f64,
    /// Exits each vCPU took during the run, by KVM's per-vCPU statistics.
    pub per_vcpu_exits: Vec<(u32, u64)>,
}

/// Checks of `labctl stress`. `before`/`after`: KVM's statistics at the checkpoints that
/// bracket the stress program, while L2 waits (quiescent points).
///
/// Relations (exits modulo 2^32): `S_before < g_before <= g_after <= S_after`, cycles
/// strictly increasing in the same order; the guest's delta is at least one exit per CPUID
/// and less than two (double counting fails); KVM's delta is at least the guest's; every
/// vCPU took at least one exit per CPUID of the threads pinned to it.
pub fn stress_checks(
    vcpus: u32,
    report: &StressReport,
    before: Option<&VmStats>,
    after: Option<&VmStats>,
) -> (Vec<Check>, StressFigures) {
    let spec = report.spec;
    let cpuids = u64::from(spec.threads) * spec.iterations;
    let (g0, g1) = (report.before, report.after);
    let exits = u64::from(g0.exits_until(&g1));
    let cycles = g1.cycles.wrapping_sub(g0.cycles);
    let secs = report.wall_ns as f64 / 1e9;
    let mut per_vcpu_exits = Vec::new();
    let mut c = Vec::new();

    let pinned = report.threads.len() == spec.threads as usize
        && report.threads.iter().all(|t| t.cpu_seen == t.cpu_wanted);
    c.push(Check::new(
        "pinned",
        pinned,
        format!(
            "{} threads on {} vCPUs (CPU wanted/seen: {})",
            spec.threads,
            report.cpus,
            report
                .threads
                .iter()
                .map(|t| format!("{}/{}", t.cpu_wanted, t.cpu_seen as i64))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ));
    let counted = g1.exits != g0.exits && exits >= cpuids && exits < 2 * cpuids;
    c.push(Check::new(
        "exits-per-cpuid",
        counted,
        format!(
            "{exits} exits for {cpuids} CPUIDs ({} x {}): excess {} (must be >= 0 and < {cpuids})",
            spec.threads,
            spec.iterations,
            exits as i64 - cpuids as i64
        ),
    ));
    // CPUID's own reason: the hammer's CPUIDs plus the reading after them (an exit of
    // that reason, counted before KVM answers it), and less than twice the hammer.
    match (report.cpuid_before, report.cpuid_after) {
        (Some(r0), Some(r1)) => {
            let grew = u64::from(r0.exits_until(&r1));
            c.push(Check::new(
                "cpuid-reason",
                grew > cpuids && grew < 2 * cpuids && r1.cycles > r0.cycles,
                format!(
                    "CPUID's reason (0x4FFFFFFE, 10): +{grew} exits, +{} cycles for {cpuids} CPUIDs (must be > {cpuids} and < {})",
                    r1.cycles.wrapping_sub(r0.cycles) as i64,
                    2 * cpuids
                ),
            ));
        }
        _ => c.push(Check::new(
            "cpuid-reason",
            false,
            "leaf 0x4FFFFFFE did not answer for CPUID's reason (the per-reason leaves are not enabled, or KVM is not patched)",
        )),
    }
    c.push(Check::new(
        "cycles-grow",
        g1.cycles > g0.cycles,
        format!(
            "+{} cycles, {:.0} cycles per exit",
            cycles as i64,
            if exits > 0 {
                cycles as f64 / exits as f64
            } else {
                0.0
            }
        ),
    ));
    match (before.and_then(host_totals), after.and_then(host_totals)) {
        (Some(s0), Some(s1)) => {
            let (e0, e1) = (s0.exits as u32, s1.exits as u32);
            let ordered = exits_le(e0.wrapping_add(1), g0.exits)
                && exits_le(g0.exits, g1.exits)
                && exits_le(g1.exits, e1)
                && s0.cycles < g0.cycles
                && g0.cycles < g1.cycles
                && g1.cycles < s1.cycles;
            let host_delta = s1.exits.wrapping_sub(s0.exits);
            c.push(Check::new(
                "matches-kvm-stats",
                ordered && host_delta >= exits,
                format!(
                    "KVM: exits {} -> {} (+{host_delta}), exit_cycles {} -> {}; guest: exits {} -> {}, cycles {} -> {}; wanted S0 < g0 <= g1 <= S1 (cycles strictly) and KVM's delta >= the guest's",
                    s0.exits, s1.exits, s0.cycles, s1.cycles, g0.exits, g1.exits, g0.cycles, g1.cycles
                ),
            ));
        }
        _ => c.push(Check::new(
            "matches-kvm-stats",
            false,
            "L1 did not report the VM's exits and exit_cycles statistics",
        )),
    }
    c.push(vcpu_reason_sums(&[("before", before), ("after", after)]));
    if let (Some(b), Some(a)) = (before, after) {
        let b: BTreeMap<u32, u64> = b
            .per_vcpu(STAT_EXITS)
            .into_iter()
            .filter_map(|(id, v)| Some((id, v?)))
            .collect();
        let mut short = Vec::new();
        for (id, v) in a.per_vcpu(STAT_EXITS) {
            let delta = v.unwrap_or(0).wrapping_sub(*b.get(&id).unwrap_or(&0));
            per_vcpu_exits.push((id, delta));
            let threads_here = report.threads.iter().filter(|t| t.cpu_wanted == id).count() as u64;
            if delta < threads_here * spec.iterations {
                short.push(format!(
                    "vCPU {id}: {delta} < {}",
                    threads_here * spec.iterations
                ));
            }
        }
        let complete = per_vcpu_exits.len() == vcpus as usize;
        c.push(Check::new(
            "every-vcpu-did-its-share",
            complete && short.is_empty(),
            if !complete {
                format!("KVM reported {} of {vcpus} vCPUs", per_vcpu_exits.len())
            } else if short.is_empty() {
                format!(
                    "exits per vCPU: {}",
                    per_vcpu_exits
                        .iter()
                        .map(|(id, d)| format!("{id}:{d}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            } else {
                short.join("; ")
            },
        ));
    } else {
        c.push(Check::new(
            "every-vcpu-did-its-share",
            false,
            "no per-vCPU statistics",
        ));
    }
    let figures = StressFigures {
        vcpus,
        threads: spec.threads,
        iterations: spec.iterations,
        cpuids,
        exits,
        excess_exits: exits as i64 - cpuids as i64,
        cycles,
        cycles_per_exit: if exits > 0 {
            cycles as f64 / exits as f64
        } else {
            0.0
        },
        exits_per_s: if secs > 0.0 { exits as f64 / secs } else { 0.0 },
        exits_per_s_per_vcpu: if secs > 0.0 {
            exits as f64 / secs / f64::from(vcpus.max(1))
        } else {
            0.0
        },
        per_vcpu_exits,
    };
    (c, figures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use exitlab_proto::msg::VcpuStats;

    fn walk(cpuid_exits: u32, other: u32) -> String {
        reasons::sdm_walk(|r| ExitStats {
            exits: match r {
                SDM_REASON_CPUID => cpuid_exits,
                1 => other,
                _ => 0,
            },
            cycles: 5,
        })
        .iter()
        .map(|l| format!("{l}\n"))
        .collect()
    }

    #[test]
    fn reason_checks_hold_for_a_consistent_walk_and_fail_otherwise() {
        let first =
            "CPUID(0x4FFFFFFE), exit reason 10 (CPUID), exits=100, cycles spent in exit=7\n";
        let ok = |c: &[Check]| c.iter().all(|c| c.ok);
        let with_reasons = |exits: u64, cpuid: u64, intr: u64| {
            let mut s = vm(exits, 1);
            s.vm.insert(stat_sdm_reason_exits(10), cpuid);
            s.vm.insert(stat_sdm_reason_exits(1), intr);
            s
        };
        let (k0, k1) = (with_reasons(500, 100, 390), with_reasons(520, 115, 405));
        let c = reason_checks(first, &walk(113, 400), Some(&k0), Some(&k1));
        assert!(ok(&c), "{c:?}");
        // A reason ahead of KVM's own counter after the walk.
        let c = reason_checks(first, &walk(113, 406), Some(&k0), Some(&k1));
        assert!(
            !c.iter()
                .find(|c| c.name == "per-reason-matches-kvm")
                .unwrap()
                .ok
        );
        // The sum outside the totals around it.
        let c = reason_checks(first, &walk(113, 500), Some(&vm(500, 1)), Some(&vm(520, 2)));
        assert!(!c.iter().find(|c| c.name == "per-reason-sum").unwrap().ok);
        // CPUID grew by less than the walk's own CPUIDs.
        let c = reason_checks(first, &walk(112, 395), Some(&vm(500, 1)), Some(&vm(520, 2)));
        assert!(!c.iter().find(|c| c.name == "per-reason-cpuid").unwrap().ok);
        // A missing reason, or a table of errors.
        let short: String = walk(113, 400)
            .lines()
            .skip(1)
            .map(|l| l.to_string() + "\n")
            .collect();
        let c = reason_checks(first, &short, Some(&vm(500, 1)), Some(&vm(520, 2)));
        assert!(!c.iter().find(|c| c.name == "per-reason-table").unwrap().ok);
        let c = reason_checks(first, "", None, None);
        assert!(!ok(&c));
    }

    fn vm(exits: u64, cycles: u64) -> VmStats {
        VmStats {
            vm: Default::default(),
            vcpus: vec![VcpuStats {
                id: 0,
                stats: [
                    (STAT_EXITS.to_string(), exits),
                    (STAT_EXIT_CYCLES.to_string(), cycles),
                ]
                .into(),
            }],
        }
    }

    fn r(exits: u32, cycles: u64) -> ExitStats {
        ExitStats { exits, cycles }
    }

    fn run(r1: ExitStats, r2: ExitStats, s1: VmStats, s2: VmStats) -> Vec<Check> {
        let lines = vec![r1.to_string(), r2.to_string()];
        lab_checks(&lines, &[r1, r2], Some(&s1), Some(&s2))
    }

    fn failed(c: &[Check]) -> Vec<&str> {
        c.iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn consistent_readings_pass() {
        let c = run(
            r(1000, 5_000),
            r(1500, 9_000),
            vm(1010, 6_000),
            vm(1600, 10_000),
        );
        assert!(all_ok(&c), "{c:?}");
    }

    #[test]
    fn zeros_fail() {
        let c = run(r(0, 0), r(0, 0), vm(10, 0), vm(20, 0));
        assert_eq!(failed(&c), ["nonzero", "growing", "matches-kvm-stats"]);
    }

    #[test]
    fn a_counter_going_backwards_fails() {
        let c = run(
            r(1500, 9_000),
            r(1000, 5_000),
            vm(1600, 9_500),
            vm(1700, 10_000),
        );
        assert!(failed(&c).contains(&"growing"), "{c:?}");
    }

    #[test]
    fn guest_ahead_of_kvm_fails() {
        // The guest claims more exits than KVM had counted at the next checkpoint.
        let c = run(
            r(1000, 5_000),
            r(1500, 9_000),
            vm(900, 6_000),
            vm(1600, 10_000),
        );
        assert_eq!(failed(&c), ["matches-kvm-stats"]);
        // Cycles of the reading's own exit must not be in the reading yet.
        let c = run(
            r(1000, 6_000),
            r(1500, 9_000),
            vm(1010, 6_000),
            vm(1600, 10_000),
        );
        assert_eq!(failed(&c), ["matches-kvm-stats"]);
    }

    #[test]
    fn exits_wrap_modulo_2_32() {
        let base = (1u64 << 32) - 10;
        let c = run(
            r((base - 5) as u32, 5_000),
            r(20, 9_000),
            vm(base, 6_000),
            vm(base + 40, 10_000),
        );
        assert!(all_ok(&c), "{c:?}");
    }

    #[test]
    fn wrong_format_is_reported() {
        let c = lab_checks(&["exits=5".into()], &[], None, None);
        assert_eq!(failed(&c), ["format"]);
    }

    #[test]
    fn missing_stats_fail() {
        let lines = vec![r(1, 1).to_string(), r(2, 2).to_string()];
        let c = lab_checks(&lines, &[r(1, 1), r(2, 2)], None, None);
        assert_eq!(failed(&c), ["matches-kvm-stats"]);
    }

    mod stress {
        use super::*;
        use exitlab_proto::stress::{StressSpec, ThreadReport};

        const K: u64 = 1000;

        fn report(vcpus: u32, g0: ExitStats, g1: ExitStats) -> StressReport {
            StressReport {
                spec: StressSpec {
                    threads: vcpus,
                    iterations: K,
                    leaf: 0,
                    subleaf: 0,
                },
                cpus: vcpus,
                before: g0,
                after: g1,
                cpuid_before: Some(r(100, 1_000)),
                cpuid_after: Some(r(100 + vcpus * K as u32 + 1, 2_000_000)),
                threads: (0..vcpus)
                    .map(|i| ThreadReport {
                        index: i,
                        cpu_wanted: i,
                        cpu_seen: i,
                        elapsed_ns: 1_000_000,
                    })
                    .collect(),
                wall_ns: 1_000_000_000,
            }
        }

        fn stats(per_vcpu: &[(u64, u64)]) -> VmStats {
            let vcpus: Vec<VcpuStats> = per_vcpu
                .iter()
                .enumerate()
                .map(|(i, (e, c))| VcpuStats {
                    id: i as u32,
                    stats: [
                        (STAT_EXITS.to_string(), *e),
                        (STAT_EXIT_CYCLES.to_string(), *c),
                        (stat_slot_sum(STAT_REASON_EXITS), *e),
                        (stat_slot_sum(STAT_REASON_CYCLES), *c),
                    ]
                    .into(),
                })
                .collect();
            VmStats {
                vm: [
                    (STAT_EXITS.to_string(), per_vcpu.iter().map(|p| p.0).sum()),
                    (
                        STAT_EXIT_CYCLES.to_string(),
                        per_vcpu.iter().map(|p| p.1).sum(),
                    ),
                ]
                .into(),
                vcpus,
            }
        }

        /// A consistent 4-vCPU run: each vCPU takes K + 50 exits during the run.
        fn good() -> (StressReport, VmStats, VmStats) {
            let s0 = stats(&[(1000, 1_000_000); 4]);
            let s1 = stats(&[(1000 + K + 50, 9_000_000); 4]);
            let g0 = r(4000 + 10, 4_100_000);
            let g1 = r((4000 + 4 * K + 150) as u32, 35_000_000);
            (report(4, g0, g1), s0, s1)
        }

        fn failed(c: &[Check]) -> Vec<String> {
            c.iter().filter(|c| !c.ok).map(|c| c.name.clone()).collect()
        }

        #[test]
        fn a_consistent_run_passes_and_reports_its_figures() {
            let (rep, s0, s1) = good();
            let (c, f) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert!(all_ok(&c), "{c:?}");
            assert_eq!(f.cpuids, 4 * K);
            assert_eq!(f.excess_exits, 140);
            assert_eq!(
                f.per_vcpu_exits,
                vec![(0, K + 50), (1, K + 50), (2, K + 50), (3, K + 50)]
            );
            assert!((f.exits_per_s - 4140.0).abs() < 1e-6);
        }

        #[test]
        fn cpuids_missing_from_their_reason_fail() {
            let (mut rep, s0, s1) = good();
            rep.cpuid_after = Some(r(100 + 4 * K as u32 - 3, 2_000_000));
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["cpuid-reason"]);
            rep.cpuid_after = None;
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["cpuid-reason"]);
        }

        #[test]
        fn lost_updates_fail() {
            let (mut rep, s0, s1) = good();
            rep.after.exits = rep.before.exits + (4 * K - 7) as u32;
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["exits-per-cpuid"]);
        }

        #[test]
        fn double_counting_fails() {
            let (mut rep, s0, mut s1) = good();
            rep.after.exits = rep.before.exits + (8 * K) as u32;
            s1.vm.insert(STAT_EXITS.into(), 20_000);
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["exits-per-cpuid"]);
        }

        #[test]
        fn torn_high_and_low_halves_fail() {
            let s0 = stats(&[(1000, 0xFFFF_0000)]);
            let s1 = stats(&[(1000 + K + 10, 0x1_0001_0000)]);
            let g0 = r(1001, 0xFFFF_FF00);
            // True value 0x1_0000_0100: old high with new low, and new high with old low.
            for torn in [0x0000_0100u64, 0x1_FFFF_FF00] {
                let rep = report(1, g0, r(1000 + K as u32 + 5, torn));
                let (c, _) = stress_checks(1, &rep, Some(&s0), Some(&s1));
                assert!(
                    failed(&c).contains(&"matches-kvm-stats".to_string()),
                    "{torn:#x}: {c:?}"
                );
            }
        }

        #[test]
        fn a_counter_going_backwards_fails() {
            let (mut rep, s0, s1) = good();
            std::mem::swap(&mut rep.before, &mut rep.after);
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            let f = failed(&c);
            assert!(f.contains(&"exits-per-cpuid".to_string()), "{f:?}");
            assert!(f.contains(&"cycles-grow".to_string()), "{f:?}");
            assert!(f.contains(&"matches-kvm-stats".to_string()), "{f:?}");
        }

        #[test]
        fn host_and_guest_disagreeing_fails() {
            let (rep, s0, mut s1) = good();
            // KVM says fewer exits happened than the guest saw.
            s1.vm.insert(STAT_EXITS.into(), 4000 + 4 * K);
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["matches-kvm-stats"]);
        }

        #[test]
        fn per_reason_sums_must_match_each_vcpu_exactly() {
            let (rep, s0, mut s1) = good();
            s1.vcpus[2]
                .stats
                .insert(stat_slot_sum(STAT_REASON_EXITS), 1000 + K + 49);
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["per-vcpu-reason-sums"]);
            let detail = &c.iter().find(|c| !c.ok).unwrap().detail;
            assert!(detail.contains("after vCPU 2"), "{detail}");
            // An unpatched KVM has no arrays: that fails too, and says so.
            let (rep, mut s0, s1) = good();
            s0.vcpus[0].stats.remove(&stat_slot_sum(STAT_REASON_CYCLES));
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["per-vcpu-reason-sums"]);
            assert!(c.iter().any(|c| c.detail.contains("is KVM patched")));
        }

        #[test]
        fn unpinned_threads_and_idle_vcpus_fail() {
            let (mut rep, s0, mut s1) = good();
            rep.threads[2].cpu_seen = 0;
            for n in [STAT_EXITS.to_string(), stat_slot_sum(STAT_REASON_EXITS)] {
                s1.vcpus[3].stats.insert(n, 1000 + 10);
            }
            let (c, _) = stress_checks(4, &rep, Some(&s0), Some(&s1));
            assert_eq!(failed(&c), ["pinned", "every-vcpu-did-its-share"]);
        }

        #[test]
        fn accounting_off_fails_loudly() {
            let s0 = stats(&[(1000, 0)]);
            let s1 = stats(&[(1000 + K + 10, 0)]);
            let rep = report(1, r(0, 0), r(0, 0));
            let (c, _) = stress_checks(1, &rep, Some(&s0), Some(&s1));
            let f = failed(&c);
            assert!(f.contains(&"exits-per-cpuid".to_string()), "{f:?}");
            assert!(f.contains(&"cycles-grow".to_string()), "{f:?}");
        }
    }
}
