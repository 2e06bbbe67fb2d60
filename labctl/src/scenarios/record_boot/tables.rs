//! The per-phase tables printed after a recording: top reasons by exits and by cycles.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::series::{Phase, PhaseReason};
use super::summary::Summary;
use crate::verify::Check;

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

pub fn print_table(
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
