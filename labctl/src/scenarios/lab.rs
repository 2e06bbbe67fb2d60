//! `labctl lab`, the assignment's scenario: `test_assignment2` twice in L2, then
//! `test_assignment3` for CPUID's reason and every SDM reason, each reading checked
//! against KVM's statistics taken by L1 between the programs.

use std::path::PathBuf;

use anyhow::Result;
use exitlab_proto::job::{Level, Step};
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::Msg;

use crate::engine::{guest_program, l2_vm, stream_output, write_results, Lab, Run};
use crate::report::{Body, Results};
use crate::verify::{self, Check};

/// The lab's L2 steps: `test_assignment2` twice, then `test_assignment3` for CPUID's
/// reason and for every SDM reason, with L1's checkpoints between them.
pub(crate) fn lab_l2_steps() -> Vec<Step> {
    vec![
        Step::Run {
            argv: guest_program("test_assignment2"),
        },
        Step::Checkpoint {
            tag: "after-1".into(),
        },
        Step::Run {
            argv: guest_program("test_assignment2"),
        },
        Step::Checkpoint {
            tag: "after-2".into(),
        },
        // The per-reason leaves: CPUID's reason alone, then every SDM reason.
        Step::Run {
            argv: [guest_program("test_assignment3"), vec!["CPUID".into()]].concat(),
        },
        Step::Run {
            argv: guest_program("test_assignment3"),
        },
        Step::Checkpoint {
            tag: "after-3".into(),
        },
    ]
}

/// The lab's checks of a run of [`lab_l2_steps`] against KVM's statistics, and the
/// readings of `test_assignment2`.
pub(crate) fn lab_l2_checks(run: &Run) -> (Vec<Check>, Vec<ExitStats>) {
    let programs = run.programs(Level::L2);
    let lines: Vec<String> = programs
        .iter()
        .take(2)
        .map(|p| p.stdout.trim_end_matches('\n').to_string())
        .collect();
    let readings: Vec<ExitStats> = lines.iter().filter_map(|l| l.parse().ok()).collect();
    let stats = run.stats();
    let mut checks = verify::lab_checks(
        &lines,
        &readings,
        stats.get("after-1"),
        stats.get("after-2"),
    );
    let out = |i: usize| programs.get(i).map_or("", |p| p.stdout.as_str());
    checks.extend(verify::reason_checks(
        out(2),
        out(3),
        stats.get("after-2"),
        stats.get("after-3"),
    ));
    checks.push(verify::vcpu_reason_sums(
        &["after-1", "after-2", "after-3"].map(|t| (t, stats.get(t))),
    ));
    (checks, readings)
}

/// `labctl lab`: `test_assignment2` twice in L2, checked against KVM's statistics.
pub fn run(lab: &Lab) -> Result<i32> {
    let (results, path) = run_lab(lab, stream_output(Level::L2))?;
    results.print_summary(&path);
    Ok(results.exit_code)
}

/// The lab scenario without its printed summary: its results, written, and where.
pub fn run_lab(lab: &Lab, on_msg: impl FnMut(&Msg)) -> Result<(Results, PathBuf)> {
    let p = lab.build()?;
    let job = l2_vm(&lab.cfg, vec![], lab_l2_steps());
    let run = lab.run(&p, "lab", &job, &[], on_msg)?;
    let mut checks = vec![run.ran_check()];
    let (l2_checks, readings) = lab_l2_checks(&run);
    checks.extend(l2_checks);
    let mut results = lab.results(&p, "lab", &run, checks);
    results.body = Some(Body::Lab { readings });
    results.l2 = Some(lab.l2_report(&run));
    let path = write_results(&results, &run)?;
    Ok((results, path))
}
