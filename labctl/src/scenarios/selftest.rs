//! `labctl selftest`: the series' own KVM selftest (exit_stats_test), run inside L1 on
//! the patched KVM; its TAP output is checked in `verify::selftest`.

use anyhow::Result;
use exitlab_proto::job::{Job, Level, Step};
use exitlab_proto::vm::l1;

use crate::engine::{stream_output, write_results, Lab};
use crate::report::Body;
use crate::verify::selftest::{parse_tap, selftest_checks};

/// `labctl selftest`: the series' KVM selftest, run inside L1 on the patched KVM.
pub fn run(lab: &Lab) -> Result<i32> {
    let p = lab.build()?;
    let job = Job {
        level: Level::L1,
        steps: vec![
            // Lets the selftest reach the leaf through KVM's instruction emulator too.
            Step::Write {
                path: "/sys/module/kvm/parameters/force_emulation_prefix".into(),
                value: "1".into(),
            },
            Step::Run {
                argv: vec![l1::SELFTEST.into()],
            },
        ],
    };
    let run = lab.run(&p, "selftest", &job, &[], stream_output(Level::L1))?;
    let prog = run.programs(Level::L1).pop();
    let tap = parse_tap(prog.as_ref().map_or("", |p| p.stdout.as_str()));
    let checks = selftest_checks(&tap, prog.and_then(|p| p.status));
    let mut results = lab.results(&p, "selftest", &run, checks);
    results.body = Some(Body::Selftest {
        planned: tap.plan,
        passed: tap.passed.len(),
        failed: tap.failed,
        skipped: tap.skipped,
    });
    let path = write_results(&results, &run)?;
    results.print_summary(&path);
    Ok(results.exit_code)
}
