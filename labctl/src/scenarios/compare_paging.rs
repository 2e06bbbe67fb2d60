//! `labctl compare-paging`: the same L2 boot twice, L1's KVM using nested paging (NPT/EPT)
//! and then shadow paging (`kvm_amd.npt=0 kvm_intel.ept=0`), each followed by
//! `test_assignment3`: the boot's exits by SDM reason, side by side.

use std::collections::BTreeMap;

use anyhow::Result;
use exitlab_proto::job::{Level, Step};
use exitlab_proto::reasons::{self, ReasonAnswer, ReasonLine};
use serde::Serialize;

use crate::engine::{self, guest_program, l2_vm, Lab};
use crate::verify::Check;

/// The two modes, and the L1 kernel parameters that select them on either vendor.
pub const MODES: [(&str, &str); 2] = [
    ("nested", "kvm_amd.npt=1 kvm_intel.ept=1"),
    ("shadow", "kvm_amd.npt=0 kvm_intel.ept=0"),
];

/// One boot: its time to userspace and its exits by reason.
/// One reason's share of a boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    pub exits: u64,
    pub cycles: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Side {
    pub mode: String,
    pub l1_cmdline: String,
    pub l2_up_s: Option<f64>,
    pub total_exits: u64,
    pub total_cycles: u64,
    /// By SDM reason; reasons with no exit left out.
    pub reasons: BTreeMap<u32, ReasonCount>,
    pub run_dir: String,
}

impl Side {
    /// Reads a walk `test_assignment3` printed; `None` unless it is the whole table.
    pub fn from_walk(mode: &str, out: &str) -> Option<Self> {
        let lines: Vec<ReasonLine> = out.lines().map(str::parse).collect::<Result<_, _>>().ok()?;
        if lines.iter().map(|l| l.reason).collect::<Vec<_>>()
            != (0..=reasons::SDM_LAST).collect::<Vec<_>>()
        {
            return None;
        }
        let mut side = Side {
            mode: mode.into(),
            ..Side::default()
        };
        for l in lines {
            if let ReasonAnswer::Stats(s) = l.answer {
                if s.exits > 0 {
                    side.reasons.insert(
                        l.reason,
                        ReasonCount {
                            exits: u64::from(s.exits),
                            cycles: s.cycles,
                        },
                    );
                    side.total_exits += u64::from(s.exits);
                    side.total_cycles += s.cycles;
                }
            }
        }
        Some(side)
    }
}

#[derive(Serialize)]
struct Summary<'a> {
    schema: &'static str,
    ok: bool,
    sides: &'a [Side],
    checks: &'a [Check],
}

/// The side-by-side table: every reason either boot took, then the totals.
pub fn table(a: &Side, b: &Side) -> String {
    let mut out = format!(
        "{:<28} {:>10} {:>14} {:>10} {:>14} {:>9}\n",
        "SDM exit reason",
        format!("{} exits", a.mode),
        "cycles",
        format!("{} exits", b.mode),
        "cycles",
        "exits ×"
    );
    let keys: std::collections::BTreeSet<u32> =
        a.reasons.keys().chain(b.reasons.keys()).copied().collect();
    let ratio = |x: u64, y: u64| match (x, y) {
        (0, 0) => "-".to_string(),
        (0, _) => "new".to_string(),
        _ => format!("{:.2}", y as f64 / x as f64),
    };
    for r in keys {
        let ReasonCount {
            exits: ea,
            cycles: ca,
        } = a.reasons.get(&r).copied().unwrap_or_default();
        let ReasonCount {
            exits: eb,
            cycles: cb,
        } = b.reasons.get(&r).copied().unwrap_or_default();
        let name = format!("{r:>2} {}", reasons::sdm_name(r).unwrap_or("?"));
        out += &format!(
            "{name:<28} {ea:>10} {ca:>14} {eb:>10} {cb:>14} {:>9}\n",
            ratio(ea, eb)
        );
    }
    out += &format!(
        "{:<28} {:>10} {:>14} {:>10} {:>14} {:>9}\n",
        "total",
        a.total_exits,
        a.total_cycles,
        b.total_exits,
        b.total_cycles,
        ratio(a.total_exits, b.total_exits)
    );
    let up = |s: &Side| s.l2_up_s.map_or("-".into(), |t| format!("{t:.1} s"));
    out += &format!("L2 up after: {} {}, {} {}\n", a.mode, up(a), b.mode, up(b));
    out
}

/// What one boot of the comparison gave: its side (if its walk was whole) and the check
/// of its walk.
pub struct Boot {
    pub side: Option<Side>,
    pub check: Check,
    /// Where its logs are, printed when it failed.
    pub logs: String,
}

/// Boots L2 with nested paging, then with shadow paging; prints and writes the comparison.
pub fn run(lab: &Lab) -> Result<i32> {
    let p = lab.build()?;
    compare(
        |mode, params| {
            let side_lab = lab.with_l1_cmdline(params);
            crate::progress::note("compare-paging", format!("{mode} paging: L1 with {params}"));
            let job = l2_vm(
                &lab.cfg,
                vec![],
                vec![Step::Run {
                    argv: guest_program("test_assignment3"),
                }],
            );
            let run = side_lab.run(&p, "compare-paging", &job, &[], |_| {})?;
            let prog = run.programs(Level::L2).pop();
            let side = prog.as_ref().and_then(|p| Side::from_walk(mode, &p.stdout));
            let ok = run.done_ok(Level::L2) && side.is_some();
            Ok(Boot {
                side: side.filter(|_| ok).map(|mut s| {
                    s.l1_cmdline = side_lab.l1_cmdline.clone();
                    s.l2_up_s = run.boot.l2_up.map(|d| d.as_secs_f64());
                    s.run_dir = run.dir.display().to_string();
                    s
                }),
                check: Check::new(
                    &format!("{mode}-walk"),
                    ok,
                    if ok {
                        format!(
                            "test_assignment3 walked every SDM reason after the {mode}-paging boot"
                        )
                    } else {
                        format!(
                            "no complete walk after the {mode}-paging boot: {}; logs in {}",
                            run.failures().join("; "),
                            run.dir.display()
                        )
                    },
                ),
                logs: run.logs.describe(),
            })
        },
        |sides, checks, ok| write(lab, sides, checks, ok),
    )
}

/// The comparison, given how to boot one mode and how to write the results. A boot that
/// fails keeps what the boots before it gave (written, marked not ok), and its status is
/// the comparison's: its error, or a failed walk's SCENARIO_FAILED.
pub fn compare(
    mut boot: impl FnMut(&str, &str) -> Result<Boot>,
    mut write: impl FnMut(&[Side], &[Check], bool) -> Result<()>,
) -> Result<i32> {
    let mut sides: Vec<Side> = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    for (mode, params) in MODES {
        let b = match boot(mode, params) {
            Ok(b) => b,
            Err(e) => {
                write(&sides, &checks, false)?;
                return Err(e.context(format!("the {mode}-paging boot failed")));
            }
        };
        checks.push(b.check);
        let Some(side) = b.side else {
            write(&sides, &checks, false)?;
            eprintln!("{}", b.logs);
            return Ok(crate::error::code::SCENARIO_FAILED.into());
        };
        sides.push(side);
    }
    let (a, b) = (&sides[0], &sides[1]);
    // What shadow paging must change on SVM/VMX: guest page faults and CR3 writes become
    // KVM's to intercept, and nested page faults are left for MMIO.
    let faults = |s: &Side| s.reasons.get(&0).map_or(0, |r| r.exits);
    checks.push(Check::new(
        "shadow-intercepts-page-faults",
        faults(b) > faults(a),
        format!(
            "EXCEPTION_NMI (guest #PF intercepted) {} with nested paging, {} with shadow paging",
            faults(a),
            faults(b)
        ),
    ));
    print!("{}", table(a, b));
    crate::verify::print_checks(&checks, 32);
    let ok = checks.iter().all(|c| c.ok);
    write(&sides, &checks, ok)?;
    Ok(crate::error::code::of_checks(ok))
}

fn write(lab: &Lab, sides: &[Side], checks: &[Check], ok: bool) -> Result<()> {
    let path = engine::write_summary(
        lab,
        "compare-paging",
        &Summary {
            schema: "kvm-exit-lab/compare-paging/v2",
            ok,
            sides,
            checks,
        },
    )?;
    println!("results:  {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use exitlab_proto::leaf::ExitStats;

    fn walk(counts: &[(u32, u32)]) -> String {
        reasons::sdm_walk(|r| ExitStats {
            exits: counts.iter().find(|c| c.0 == r).map_or(0, |c| c.1),
            cycles: 10,
        })
        .iter()
        .map(|l| format!("{l}\n"))
        .collect()
    }

    /// The comparison with fake boots: `second` is what the shadow-paging boot gives.
    fn compare_with(second: impl Fn() -> Result<Boot>) -> (Result<i32>, Vec<(usize, bool)>) {
        let mut written = Vec::new();
        let r = compare(
            |mode, _| {
                if mode == "nested" {
                    Ok(Boot {
                        side: Side::from_walk(mode, &walk(&[(10, 5), (48, 100)])),
                        check: Check::new("nested-walk", true, ""),
                        logs: String::new(),
                    })
                } else {
                    second()
                }
            },
            |sides, _, ok| {
                written.push((sides.len(), ok));
                Ok(())
            },
        );
        (r, written)
    }

    #[test]
    fn a_second_boot_that_fails_keeps_the_first_and_gives_its_status() {
        // The shadow boot crashed: the nested side is written, not ok, and the error is
        // the comparison's (its exit status is the boot's).
        use crate::error::{code, LabError};
        let (r, written) = compare_with(|| {
            Err(LabError::VmCrashed {
                what: "L2's QEMU exited".into(),
                logs: String::new(),
            }
            .into())
        });
        let e = r.unwrap_err();
        assert!(
            format!("{e:#}").contains("the shadow-paging boot failed"),
            "{e:#}"
        );
        let status = e.downcast_ref::<LabError>().map(LabError::exit_code);
        assert_eq!(status, Some(code::VM_CRASHED));
        assert_eq!(written, [(1, false)]);
        // It booted but its walk is not whole: the same, with SCENARIO_FAILED.
        let (r, written) = compare_with(|| {
            Ok(Boot {
                side: None,
                check: Check::new("shadow-walk", false, "no complete walk"),
                logs: String::new(),
            })
        });
        assert_eq!(r.unwrap(), i32::from(crate::error::code::SCENARIO_FAILED));
        assert_eq!(written, [(1, false)]);
        // Both fine: both sides written, ok.
        let (r, written) = compare_with(|| {
            Ok(Boot {
                side: Side::from_walk("shadow", &walk(&[(0, 900), (10, 5)])),
                check: Check::new("shadow-walk", true, ""),
                logs: String::new(),
            })
        });
        assert_eq!(r.unwrap(), 0);
        assert_eq!(written, [(2, true)]);
    }

    #[test]
    fn a_walk_becomes_a_side_and_two_sides_a_table() {
        let a = Side::from_walk("nested", &walk(&[(10, 5), (48, 100)])).unwrap();
        assert_eq!(a.total_exits, 105);
        assert_eq!(a.reasons.len(), 2);
        let b = Side::from_walk("shadow", &walk(&[(0, 900), (10, 5), (48, 3)])).unwrap();
        let t = table(&a, &b);
        assert!(t.contains(" 0 EXCEPTION_NMI"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with(" 0 EXCEPTION_NMI") && l.ends_with("new")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("48 EPT_VIOLATION") && l.ends_with("0.03")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("total") && l.contains("908")),
            "{t}"
        );
        // Not a whole table: no side.
        assert!(Side::from_walk("x", "").is_none());
        let short: String = walk(&[])
            .lines()
            .skip(1)
            .map(|l| l.to_string() + "\n")
            .collect();
        assert!(Side::from_walk("x", &short).is_none());
    }
}
