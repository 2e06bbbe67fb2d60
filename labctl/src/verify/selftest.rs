//! The series' selftest: its TAP output, and the checks on it.

use exitlab_proto::msg::Status;

use super::Check;

/// TAP result of a kselftest run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tap {
    pub plan: Option<usize>,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub skipped: Vec<String>,
}

pub fn parse_tap(out: &str) -> Tap {
    let mut t = Tap::default();
    for l in out.lines() {
        let l = l.trim();
        if let Some(n) = l.strip_prefix("1..") {
            t.plan = n.trim().parse().ok();
        } else if let Some(rest) = l.strip_prefix("not ok ") {
            t.failed.push(rest.to_string());
        } else if let Some(rest) = l.strip_prefix("ok ") {
            if rest.contains("# SKIP") {
                t.skipped.push(rest.to_string());
            } else {
                t.passed.push(rest.to_string());
            }
        }
    }
    t
}

pub fn selftest_checks(tap: &Tap, status: Option<Status>) -> Vec<Check> {
    let planned = tap.plan.unwrap_or(0);
    vec![
        Check::new(
            "exit-status",
            status == Some(Status::Code(0)),
            format!(
                "the selftest: {}",
                status.map_or("did not run".into(), |s| s.to_string())
            ),
        ),
        Check::new(
            "all-cases-passed",
            planned > 0
                && tap.passed.len() == planned
                && tap.failed.is_empty()
                && tap.skipped.is_empty(),
            format!(
                "{} of {planned} planned cases passed; failed: {:?}; skipped: {:?}",
                tap.passed.len(),
                tap.failed,
                tap.skipped
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify;

    #[test]
    fn tap_results() {
        let out = "TAP version 13\n1..3\nok 1 1 vCPU(s): 500 exits\nnot ok 2 boom\nok 3 # SKIP no fep\n# Totals: pass:1 fail:1\n";
        let t = parse_tap(out);
        assert_eq!(t.plan, Some(3));
        assert_eq!((t.passed.len(), t.failed.len(), t.skipped.len()), (1, 1, 1));
        let c = selftest_checks(&t, Some(Status::Code(1)));
        assert!(c.iter().all(|c| !c.ok));
        let good = parse_tap("1..2\nok 1 a\nok 2 b\n");
        assert!(verify::all_ok(&selftest_checks(
            &good,
            Some(Status::Code(0))
        )));
        // A run that printed nothing is not a pass.
        assert!(!verify::all_ok(&selftest_checks(
            &parse_tap(""),
            Some(Status::Code(0))
        )));
    }
}
