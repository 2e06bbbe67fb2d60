//! Stage 6 of the pipeline, verification: named checks on what the guest read and what
//! KVM's own statistics say.

use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{VmStats, STAT_EXITS, STAT_EXIT_CYCLES};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

pub fn all_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
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
            "exits {} and {}, cycles {} and {} (all zero: the accounting is off, or KVM is not patched)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use exitlab_proto::msg::VcpuStats;

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
}
