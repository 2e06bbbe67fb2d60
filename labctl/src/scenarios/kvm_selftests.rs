//! `labctl kvm-selftests`: KVM's own selftests, built from the patched tree and run in L1,
//! on the patched kernel and, with `--baseline`, on an unpatched one: the series must not
//! change their outcome.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use exitlab_proto::job::{Job, Level, Step};
use exitlab_proto::msg::Status;
use serde::Serialize;

use crate::cli::{check_baseline, CommonArgs, Global};
use crate::engine::{self, stream_output, Lab, Prepared};
use crate::error::setup;
use crate::images::UserFile;
use crate::kernel::{self, KernelDirs};
use crate::verify::Check;

/// The upstream tests that can run in the lab's L1 (KVM on emulated SVM, no Xen, no PMU
/// passthrough), and that touch what the series changes: binary stats, CPUID, the
/// run loop; and the lab's own check of its emulator workaround
/// (`kernel/6.12/lab-patches`): an interrupt pending across `sti; hlt` wakes the HLT.
pub const DEFAULT_TESTS: [&str; 7] = [
    "kvm_binary_stats_test",
    "x86_64/cpuid_test",
    "x86_64/set_sregs_test",
    "x86_64/hyperv_cpuid",
    "x86_64/xen_vmcall_test",
    "x86_64/xen_shinfo_test",
    "x86_64/sti_hlt_wakeup_test",
];

/// kselftest's exit status for a test that cannot run here.
const KSFT_SKIP: i32 = 4;

/// One test's outcome on one kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Skip,
    Fail,
}

impl Outcome {
    fn of(status: Option<Status>) -> Self {
        match status {
            Some(Status::Code(0)) => Outcome::Pass,
            Some(Status::Code(KSFT_SKIP)) => Outcome::Skip,
            _ => Outcome::Fail,
        }
    }
}

/// Checks a test name: a path under `tools/testing/selftests/kvm`, without `.c`, whose
/// source exists in the tree.
pub fn validate(tree: &Path, name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/');
    if name.is_empty() || !ok_chars || name.starts_with('/') || name.contains("//") {
        return Err(setup(format!(
            "--tests: {name:?} is not a KVM selftest name; give paths like x86_64/cpuid_test"
        )));
    }
    let src = tree
        .join("tools/testing/selftests/kvm")
        .join(format!("{name}.c"));
    if !src.is_file() {
        return Err(setup(format!(
            "--tests: no KVM selftest {name:?} in the kernel tree ({} does not exist)",
            src.display()
        )));
    }
    Ok(())
}

/// One boot of L1 on `p.kernel` running every test in turn; their outcomes, in order.
fn run_all(
    lab: &Lab,
    p: &Prepared,
    bins: &[PathBuf],
    label: &str,
    run_dirs: &mut Vec<PathBuf>,
) -> Result<Vec<Outcome>> {
    let files: Vec<UserFile> = bins
        .iter()
        .map(|b| UserFile::from_path(b))
        .collect::<Result<_>>()?;
    let steps = files
        .iter()
        .map(|f| Step::Test {
            argv: vec![format!("./{}", f.name)],
        })
        .collect();
    let job = Job {
        level: Level::L1,
        steps,
    };
    crate::progress::note("kvm-selftests", format!("{label}: {}", p.kernel.display()));
    let run = lab.run(p, "kvm-selftests", &job, &files, stream_output(Level::L1))?;
    run_dirs.push(run.dir.clone());
    let programs = run.programs(Level::L1);
    Ok((0..bins.len())
        .map(|i| Outcome::of(programs.get(i).and_then(|r| r.status)))
        .collect())
}

#[derive(Serialize)]
struct TestResult {
    name: String,
    patched: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    unpatched: Option<Outcome>,
}

#[derive(Serialize)]
struct Summary {
    schema: &'static str,
    ok: bool,
    tests: Vec<TestResult>,
    checks: Vec<Check>,
    run_dirs: Vec<PathBuf>,
}

/// Builds `tests`, runs them on the patched kernel and, if given, on `baseline`.
#[derive(Args, Clone)]
pub struct KvmSelftestsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Tests to run: paths under tools/testing/selftests/kvm, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          default_values_t = DEFAULT_TESTS.map(String::from))]
    pub tests: Vec<String>,
    /// An unpatched bzImage (same source and config) to run the same tests on, e.g.
    /// build/baseline/kernel/obj/arch/x86/boot/bzImage after `labctl bench exit-cost
    /// --lab-kernel` (the lab's configuration: the bench's default kernels have jump
    /// labels, which L1 under multi-threaded TCG can crash on).
    #[arg(long, value_name = "BZIMAGE")]
    pub baseline: Option<PathBuf>,
}

impl KvmSelftestsArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        check_baseline(self.baseline.as_deref())?;
        let lab = g.lab(self.common.into())?;
        run(&lab, &self.tests, self.baseline.as_deref())
    }
}

pub fn run(lab: &Lab, tests: &[String], baseline: Option<&Path>) -> Result<i32> {
    let p = lab.build()?;
    let dirs = KernelDirs::new(&lab.cfg.build_dir, lab.cfg.kernel_series);
    for t in tests {
        validate(&dirs.src(), t)?;
    }
    let bins = kernel::build_kvm_selftests(&lab.sh, &dirs, tests)?;
    let mut run_dirs = Vec::new();
    let patched = run_all(lab, &p, &bins, "patched kernel", &mut run_dirs)?;
    let unpatched = match baseline {
        Some(k) => {
            let b = Prepared {
                kernel: k.to_path_buf(),
                ..p.clone()
            };
            Some(run_all(lab, &b, &bins, "unpatched kernel", &mut run_dirs)?)
        }
        None => None,
    };
    let mut checks = Vec::new();
    let mut results = Vec::new();
    for (i, name) in tests.iter().enumerate() {
        let (a, b) = (patched[i], unpatched.as_ref().map(|u| u[i]));
        checks.push(Check::new(
            &format!("{name}: runs"),
            a != Outcome::Fail,
            format!("{a:?} on the patched kernel (pass, or skip: exit 4, cannot run here)"),
        ));
        if let Some(b) = b {
            checks.push(Check::new(
                &format!("{name}: as unpatched"),
                a == b,
                format!("{a:?} patched, {b:?} unpatched"),
            ));
        }
        results.push(TestResult {
            name: name.clone(),
            patched: a,
            unpatched: b,
        });
    }
    crate::verify::print_checks(&checks, 40);
    let ok = checks.iter().all(|c| c.ok);
    let summary = Summary {
        schema: "kvm-exit-lab/kvm-selftests/v1",
        ok,
        tests: results,
        checks,
        run_dirs,
    };
    let path = engine::write_summary(lab, "kvm-selftests", &summary)?;
    println!("results:  {}", path.display());
    Ok(crate::error::code::of_checks(ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_kselftest_exit_codes() {
        assert_eq!(Outcome::of(Some(Status::Code(0))), Outcome::Pass);
        assert_eq!(Outcome::of(Some(Status::Code(4))), Outcome::Skip);
        assert_eq!(Outcome::of(Some(Status::Code(1))), Outcome::Fail);
        assert_eq!(Outcome::of(None), Outcome::Fail);
    }

    #[test]
    fn bad_names_are_refused_before_make() {
        let tree = std::env::temp_dir().join(format!("kst-{}", std::process::id()));
        let dir = tree.join("tools/testing/selftests/kvm/x86_64");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpuid_test.c"), "").unwrap();
        assert!(validate(&tree, "x86_64/cpuid_test").is_ok());
        for bad in [
            "",
            "../etc",
            "/abs",
            "x86_64/nope",
            "a b",
            "x86_64//cpuid_test",
        ] {
            let e = validate(&tree, bad).unwrap_err().to_string();
            assert!(e.contains("--tests"), "{bad:?}: {e}");
        }
        let _ = std::fs::remove_dir_all(&tree);
    }
}
