//! Stage 5 of the pipeline, the scenarios: what runs in the lab, and how its messages are
//! read back. Each scenario builds a job, boots the lab with it, then verifies and reports.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use exitlab_proto::job::{Job, Level, Step, VmJob};
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{Msg, Status, Stream, VmStats};
use exitlab_proto::stress::{StressReport, StressSpec};
use exitlab_proto::vm::{l1, Machine};

use crate::accel::{self, AccelDecision, HostFacts};
use crate::boot::{self, BootResult, BootSpec, RunLogs};
use crate::config::LabConfig;
use crate::doctor::{self, Need};
use crate::error::code;
use crate::images::{self, Artifacts, UserFile};
use crate::kernel::{self, BuildInfo, KernelDirs, KernelInputs};
use crate::report::{AccelReport, Results, StatsReport, Timings, VmReport};
use crate::verify::{self, Check};

/// Everything a scenario needs before it boots.
pub struct Lab {
    /// The build directory's lock, held while this labctl uses it.
    pub lock: std::sync::Arc<crate::lock::BuildLock>,
    pub cfg: LabConfig,
    pub repo: PathBuf,
    pub artifacts: Artifacts,
    /// Extra kernel command line for L1, e.g. `kvm.exit_accounting=0`.
    pub l1_cmdline: String,
}

#[derive(Clone)]
pub struct Prepared {
    pub kernel: PathBuf,
    pub image: PathBuf,
    pub build: Option<BuildInfo>,
    pub accel: AccelDecision,
    pub qemu: PathBuf,
    /// L1's command line before the user's `--l1-cmdline`: [`L1_CMDLINE`] for the lab's
    /// kernel (KVM built in); empty for a distribution kernel whose KVM is a module.
    pub l1_cmdline_base: String,
    /// How long [`Lab::build`] took (None when the scenario prepared otherwise).
    pub built_in: Option<std::time::Duration>,
}

/// L1 is the course's host: its KVM answers the exit statistics leaves for every VM
/// (`kvm.exit_stats_leaves`, see kernel/README.md), since L2's QEMU does not know the
/// per-VM capability. The user's `--l1-cmdline` comes after, so it can turn that off.
pub const L1_CMDLINE: &str = "kvm.exit_stats_leaves=1";

pub(crate) fn l1_cmdline(base: &str, user: &str) -> String {
    [base, user]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Lab {
    /// The same lab with another configuration, validated (sweeps, benchmarks).
    pub fn with_config(&self, cfg: LabConfig) -> Result<Lab> {
        cfg.validate()?;
        Ok(Lab {
            lock: self.lock.clone(),
            cfg,
            repo: self.repo.clone(),
            artifacts: self.artifacts.clone(),
            l1_cmdline: self.l1_cmdline.clone(),
        })
    }

    /// The same lab with `extra` appended to L1's kernel command line.
    pub fn with_l1_cmdline(&self, extra: &str) -> Lab {
        Lab {
            lock: self.lock.clone(),
            cfg: self.cfg.clone(),
            repo: self.repo.clone(),
            artifacts: self.artifacts.clone(),
            l1_cmdline: l1_cmdline(&self.l1_cmdline, extra),
        }
    }

    /// `labctl build`: the kernel, the selftest, the guest programs and the L1 image.
    pub fn build(&self) -> Result<Prepared> {
        let started = std::time::Instant::now();
        let accel = accel::decide(self.cfg.accel, &HostFacts::probe())?;
        doctor::require(&[Need::Executable("qemu-system-x86_64")])?;
        let qemu = doctor::which("qemu-system-x86_64").expect("required above");
        let (kernel, selftest, build) = match (&self.artifacts.kernel, &self.artifacts.selftest) {
            (Some(k), Some(s)) => (k.clone(), s.clone(), None),
            _ => {
                let dirs = KernelDirs::new(&self.cfg.build_dir, self.cfg.kernel_series);
                let info = kernel::build(
                    &xshell::Shell::new()?,
                    &dirs,
                    &KernelInputs {
                        series: self.cfg.kernel_series,
                        source: self.cfg.kernel_src.as_deref(),
                        patches: kernel::lab_kernel_patches(&self.repo, self.cfg.kernel_series)?,
                        selftest: true,
                        config_fragment: &self.repo.join("kernel/lab.config"),
                    },
                )?;
                (
                    self.artifacts.kernel.clone().unwrap_or(dirs.bzimage()),
                    self.artifacts.selftest.clone().unwrap_or(dirs.selftest()),
                    // Built only for the selftest, a prebuilt --kernel boots instead: the
                    // results must not describe the built one as the kernel that ran.
                    self.artifacts.kernel.is_none().then_some(info),
                )
            }
        };
        let image = match &self.artifacts.l1_image {
            Some(i) => i.clone(),
            None => {
                let guest = match &self.artifacts.guest_dir {
                    Some(d) => d.clone(),
                    None => images::build_guest(&self.repo, &self.cfg.build_dir)?,
                };
                images::l1_base_image(&self.cfg.build_dir, &kernel, &guest, &selftest)?
            }
        };
        Ok(Prepared {
            kernel,
            image,
            build,
            accel,
            qemu,
            l1_cmdline_base: L1_CMDLINE.into(),
            built_in: Some(started.elapsed()),
        })
    }

    /// Boots the lab with `job` and `files`; `on_msg` sees every message as it arrives.
    pub fn run(
        &self,
        p: &Prepared,
        scenario: &str,
        job: &Job,
        files: &[UserFile],
        on_msg: impl FnMut(&Msg),
    ) -> Result<Run> {
        self.run_with(p, scenario, job, files, vec![], on_msg)
    }

    /// As [`Lab::run`], with extra QEMU arguments for L1 (e.g. a disk).
    pub fn run_with(
        &self,
        p: &Prepared,
        scenario: &str,
        job: &Job,
        files: &[UserFile],
        qemu_extra: Vec<String>,
        on_msg: impl FnMut(&Msg),
    ) -> Result<Run> {
        let dir = boot::new_run_dir(&self.cfg.build_dir, scenario)?;
        let logs = RunLogs::new(&dir);
        let initrd = dir.join("initrd.cpio");
        let started = std::time::Instant::now();
        images::run_initrd(&p.image, job, files, &initrd)?;
        let image = started.elapsed();
        let spec = BootSpec {
            qemu: p.qemu.clone(),
            accel: &p.accel,
            l1_vcpus: self.cfg.l1_vcpus(p.accel.accel),
            l1_memory_mib: self.cfg.l1_memory_mib,
            kernel: &p.kernel,
            initrd: &initrd,
            timeout: self.cfg.timeout,
            qemu_extra,
            cmdline_extra: l1_cmdline(&p.l1_cmdline_base, &self.l1_cmdline),
        };
        let result = boot::boot(&spec, &logs, on_msg);
        // The run's initrd is a copy of the cached image plus the job: not worth keeping.
        let _ = std::fs::remove_file(&initrd);
        Ok(Run {
            boot: result?,
            logs,
            dir,
            image,
        })
    }

    /// L2 as configured, and the kernel it reported (None if it never came up).
    pub fn l2_report(&self, run: &Run) -> VmReport {
        VmReport {
            vcpus: self.cfg.l2_vcpus,
            memory_mib: self.cfg.l2_memory_mib,
            kernel: run.kernel(Level::L2),
        }
    }

    /// The results skeleton shared by all scenarios.
    pub fn results(
        &self,
        p: &Prepared,
        scenario: &str,
        run: &Run,
        mut checks: Vec<Check>,
    ) -> Results {
        checks.push(run.no_stalls());
        let ok = verify::all_ok(&checks);
        // A guest that vanished mid-run is a crashed VM (126), not a failed check (1).
        let vanished = run.l2_vanished();
        let exit_code = match (ok, &vanished) {
            (true, _) => 0,
            (false, Some(_)) => code::VM_CRASHED.into(),
            (false, None) => code::SCENARIO_FAILED.into(),
        };
        let notes = vanished
            .map(|why| {
                format!(
                    "L2 went away before it was done ({why}): a crashed VM, exit status 126; logs in {}",
                    run.dir.display()
                )
            })
            .into_iter()
            .collect();
        Results {
            schema: crate::report::SCHEMA,
            scenario: scenario.into(),
            ok,
            exit_code,
            kernel: p.build.clone(),
            accel: AccelReport {
                kind: p.accel.accel.name().into(),
                cpu: p.accel.cpu.clone(),
                reason: p.accel.reason.clone(),
            },
            l1: VmReport {
                vcpus: self.cfg.l1_vcpus(p.accel.accel),
                memory_mib: self.cfg.l1_memory_mib,
                kernel: run.kernel(Level::L1),
            },
            l2: None,
            readings: vec![],
            kvm_stats: run
                .stats()
                .iter()
                .map(|(k, v)| (k.clone(), StatsReport::from(v)))
                .collect(),
            checks,
            stress: None,
            notes,
            timings: Timings {
                build_s: p.built_in.map(|d| d.as_secs_f64()),
                image_s: run.image.as_secs_f64(),
                l1_up_s: run.boot.l1_up.map(|d| d.as_secs_f64()),
                l2_up_s: run.boot.l2_up.map(|d| d.as_secs_f64()),
                l2_done_s: run.boot.l2_done.map(|d| d.as_secs_f64()),
                total_s: run.boot.total.as_secs_f64(),
            },
            logs: run.logs.clone(),
        }
    }
}

/// One finished boot.
pub struct Run {
    pub boot: BootResult,
    pub logs: RunLogs,
    pub dir: PathBuf,
    /// Writing the run's initramfs.
    pub image: std::time::Duration,
}

/// A program a step ran, with its collected output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgramRun {
    pub argv: Vec<String>,
    pub stdout: String,
    pub stderr: String,
    pub status: Option<Status>,
}

impl Run {
    /// Programs run at `level`, in order, with their output.
    pub fn programs(&self, level: Level) -> Vec<ProgramRun> {
        collect_programs(&self.boot.msgs, level)
    }

    /// KVM statistics of the L2 VM by checkpoint tag.
    pub fn stats(&self) -> BTreeMap<String, VmStats> {
        self.boot
            .msgs
            .iter()
            .filter_map(|m| match m {
                Msg::KvmStats { tag, vm } => Some((tag.clone(), vm.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn kernel(&self, level: Level) -> Option<String> {
        self.boot.msgs.iter().find_map(|m| match m {
            Msg::Hello {
                level: l, kernel, ..
            } if *l == level => Some(kernel.clone()),
            _ => None,
        })
    }

    /// Steps that failed (`Failed` messages), as "L2: why".
    pub fn failures(&self) -> Vec<String> {
        self.boot
            .msgs
            .iter()
            .filter_map(|m| match m {
                Msg::Failed { level, error } => Some(format!("{level}: {error}")),
                _ => None,
            })
            .collect()
    }

    /// Why L2 went away before it reported done (its QEMU exited, or it stopped talking),
    /// as L1 saw it; `None` if L2 finished or there was no L2.
    pub fn l2_vanished(&self) -> Option<String> {
        let l2_done = self.boot.msgs.iter().any(|m| {
            matches!(
                m,
                Msg::Done {
                    level: Level::L2,
                    ..
                }
            )
        });
        if l2_done {
            return None;
        }
        self.boot.msgs.iter().find_map(|m| match m {
            Msg::Failed {
                level: Level::L1,
                error,
            } if error.starts_with("L2") => Some(error.clone()),
            _ => None,
        })
    }

    /// The `no-stalls` check over both consoles of this run.
    pub fn no_stalls(&self) -> Check {
        verify::no_stalls(&[("L1", &self.logs.l1_console), ("L2", &self.logs.l2_console)])
    }

    /// `ran`: L1 and L2 both reported done, without a failed step.
    pub fn ran_check(&self) -> Check {
        Check::new(
            "ran",
            self.done_ok(Level::L2) && self.done_ok(Level::L1),
            match self.failures().as_slice() {
                [] => "L1 and L2 ran every step".to_string(),
                f => f.join("; "),
            },
        )
    }

    pub fn done_ok(&self, level: Level) -> bool {
        self.boot
            .msgs
            .iter()
            .any(|m| matches!(m, Msg::Done { level: l, ok: true } if *l == level))
    }
}

pub fn collect_programs(msgs: &[Msg], level: Level) -> Vec<ProgramRun> {
    let mut runs = Vec::new();
    let mut cur = ProgramRun::default();
    for m in msgs {
        match m {
            Msg::Output {
                level: l,
                stream,
                text,
            } if *l == level => match stream {
                Stream::Stdout => cur.stdout.push_str(text),
                Stream::Stderr => cur.stderr.push_str(text),
            },
            Msg::Exited {
                level: l,
                argv,
                status,
            } if *l == level => {
                cur.argv = argv.clone();
                cur.status = Some(*status);
                runs.push(std::mem::take(&mut cur));
            }
            _ => {}
        }
    }
    runs
}

/// Prints L2 program output live (for `exec` and the selftest).
pub fn stream_output(level: Level) -> impl FnMut(&Msg) {
    move |m| {
        if let Msg::Output {
            level: l,
            stream,
            text,
        } = m
        {
            if *l == level {
                let _ = match stream {
                    Stream::Stdout => {
                        let mut o = std::io::stdout();
                        o.write_all(text.as_bytes()).and_then(|_| o.flush())
                    }
                    Stream::Stderr => std::io::stderr().write_all(text.as_bytes()),
                };
            }
        }
    }
}

pub(crate) fn l2_vm(cfg: &LabConfig, files: Vec<String>, steps: Vec<Step>) -> Job {
    l2_vm_with_args(cfg, files, steps, "")
}

pub(crate) fn l2_vm_with_args(
    cfg: &LabConfig,
    files: Vec<String>,
    steps: Vec<Step>,
    kernel_args: &str,
) -> Job {
    Job {
        level: Level::L1,
        steps: vec![Step::Vm(VmJob {
            vcpus: cfg.l2_vcpus,
            memory_mib: cfg.l2_memory_mib,
            files,
            kernel_args: kernel_args.into(),
            job: Job {
                level: Level::L2,
                steps,
            },
            disk_boot: None,
            record: None,
            machine: Machine::default(),
        })],
    }
}

pub(crate) fn guest_program(name: &str) -> Vec<String> {
    vec![format!("{}/{name}", l1::GUEST_BIN_DIR)]
}

/// Writes a summary of several runs (a sweep, a benchmark) as
/// `build/runs/<name>-<pid>.yaml`, next to the runs' own directories.
pub(crate) fn write_summary(
    lab: &Lab,
    name: &str,
    value: &impl serde::Serialize,
) -> Result<PathBuf> {
    let path = lab
        .cfg
        .build_dir
        .join("runs")
        .join(format!("{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, serde_yaml_ng::to_string(value)?)?;
    Ok(path)
}

pub(crate) fn write_results(results: &Results, run: &Run) -> Result<PathBuf> {
    let path = run.dir.join("results.yaml");
    results.write(&path)?;
    Ok(path)
}

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
pub fn lab(lab: &Lab) -> Result<i32> {
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
    results.readings = readings;
    results.l2 = Some(lab.l2_report(&run));
    let path = write_results(&results, &run)?;
    Ok((results, path))
}

/// Exit status of `labctl exec` when the command could not be started in the guest.
pub const EXEC_CANNOT_START: i32 = 127;

/// `labctl exec`: a command in L2, with host files copied in; its status becomes ours.
pub fn exec(lab: &Lab, files: &[PathBuf], argv: &[String]) -> Result<i32> {
    let files: Vec<UserFile> = files
        .iter()
        .map(|f| UserFile::from_path(f))
        .collect::<Result<_>>()?;
    let p = lab.build()?;
    let job = l2_vm(
        &lab.cfg,
        files.iter().map(|f| f.name.clone()).collect(),
        vec![Step::Run {
            argv: argv.to_vec(),
        }],
    );
    let run = lab.run(&p, "exec", &job, &files, stream_output(Level::L2))?;
    let status = run.programs(Level::L2).last().and_then(|r| r.status);
    let code = match status {
        Some(s) => s.shell_code(),
        None => EXEC_CANNOT_START,
    };
    let detail = match status {
        Some(s) => format!("{argv:?} in L2: {s}"),
        None => format!(
            "{argv:?} could not run in L2: {}",
            run.failures().join("; ")
        ),
    };
    let mut results = lab.results(
        &p,
        "exec",
        &run,
        vec![Check::new("exit-status", code == 0, &detail)],
    );
    results.exit_code = code;
    results.l2 = Some(lab.l2_report(&run));
    let path = write_results(&results, &run)?;
    eprintln!("[exec] {detail}; results: {}", path.display());
    if code != 0 {
        eprintln!("[exec] logs:\n{}", run.logs.describe());
    }
    Ok(code)
}

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

/// `labctl selftest`: the series' KVM selftest, run inside L1 on the patched KVM.
pub fn selftest(lab: &Lab) -> Result<i32> {
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
    let results = lab.results(&p, "selftest", &run, checks);
    let path = write_results(&results, &run)?;
    results.print_summary(&path);
    Ok(results.exit_code)
}

/// What `labctl stress` was asked to do.
#[derive(Debug, Clone)]
pub struct StressRequest {
    /// L2 vCPU counts to run, one boot each.
    pub sweep: Vec<u32>,
    /// Threads per run; None: as many as vCPUs.
    pub threads: Option<u32>,
    pub iterations: u64,
    pub leaf: u32,
    pub subleaf: u32,
}

/// The most CPUIDs one stress run may execute (threads × iterations).
pub const MAX_STRESS_CPUIDS: u64 = 100_000_000;

impl StressRequest {
    pub fn validate(&self) -> Result<()> {
        if self.sweep.is_empty() {
            return Err(crate::error::setup(
                "--vcpus needs at least one count, e.g. 1,2,4",
            ));
        }
        if self.iterations == 0 {
            return Err(crate::error::setup(
                "--iterations 0 would execute no CPUID: give at least 1",
            ));
        }
        if self.threads == Some(0) {
            return Err(crate::error::setup("--threads must be at least 1"));
        }
        for v in &self.sweep {
            let t = u64::from(self.threads.unwrap_or(*v));
            if t.saturating_mul(self.iterations) > MAX_STRESS_CPUIDS {
                return Err(crate::error::setup(format!(
                    "{t} threads x {} iterations is more than the {MAX_STRESS_CPUIDS} CPUIDs a run may execute (each is a VM exit of ~35 us here)",
                    self.iterations
                )));
            }
        }
        Ok(())
    }
}

/// Parses `--vcpus 1,2,4` (or one number).
pub fn parse_vcpu_list(s: &str) -> Result<Vec<u32>, String> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: give vCPU counts like 4 or 1,2,4"))
        })
        .collect()
}

/// `labctl stress`: T threads pinned to L2's vCPUs execute CPUID K times each; the
/// counters are checked against KVM's statistics. One boot per vCPU count of the sweep.
pub fn stress(lab: &Lab, req: &StressRequest) -> Result<i32> {
    req.validate()?;
    let mut labs = Vec::new();
    for &v in &req.sweep {
        let mut cfg = lab.cfg.clone();
        cfg.l2_vcpus = v;
        labs.push(lab.with_config(cfg)?);
    }
    let p = lab.build()?;
    let mut rows = Vec::new();
    let mut exit_code = 0;
    for one in labs {
        let v = one.cfg.l2_vcpus;
        let spec = StressSpec {
            threads: req.threads.unwrap_or(v),
            iterations: req.iterations,
            leaf: req.leaf,
            subleaf: req.subleaf,
        };
        let mut notes = Vec::new();
        if spec.threads > v {
            notes.push(format!(
                "{} threads on {v} vCPUs: threads share vCPUs (thread i runs on vCPU i mod {v})",
                spec.threads
            ));
        }
        crate::progress::note(
            "stress",
            format!(
                "{v} vCPU(s), {} threads x {} CPUID({:#x})",
                spec.threads, spec.iterations, spec.leaf
            ),
        );
        let job = l2_vm(
            &one.cfg,
            vec![],
            vec![
                Step::Checkpoint {
                    tag: "before".into(),
                },
                Step::Run { argv: spec.argv() },
                Step::Checkpoint {
                    tag: "after".into(),
                },
            ],
        );
        let run = one.run(&p, "stress", &job, &[], |_| {})?;
        let prog = run.programs(Level::L2).pop();
        let report = prog
            .as_ref()
            .and_then(|pr| pr.stdout.lines().last())
            .and_then(|l| StressReport::from_json(l).ok());
        let stats = run.stats();
        let mut checks = vec![Check::new(
            "ran",
            report.is_some() && run.done_ok(Level::L2),
            match (&prog, &report) {
                (Some(_), Some(_)) => "the stress program ran and reported".to_string(),
                (Some(pr), None) => format!(
                    "the stress program ended with {} and no report: {}",
                    pr.status.map_or("no status".into(), |s| s.to_string()),
                    pr.stderr.trim()
                ),
                (None, _) => format!(
                    "the stress program did not run: {}",
                    run.failures().join("; ")
                ),
            },
        )];
        let mut figures = None;
        if let Some(rep) = &report {
            let (c, f) = verify::stress_checks(v, rep, stats.get("before"), stats.get("after"));
            checks.extend(c);
            figures = Some(f);
        }
        let mut results = one.results(&p, "stress", &run, checks);
        results.readings = report.iter().flat_map(|r| [r.before, r.after]).collect();
        results.l2 = Some(one.l2_report(&run));
        results.stress = figures.clone();
        results.notes.extend(notes);
        let path = write_results(&results, &run)?;
        results.print_summary(&path);
        println!();
        // The worst of the boots: a crashed VM (126) over a failed check (1).
        exit_code = exit_code.max(results.exit_code);
        rows.push((v, results.ok, figures, path));
    }
    print_stress_table(&rows);
    let sweep = write_summary(lab, "stress-sweep", &rows)?;
    println!("sweep:    {}", sweep.display());
    Ok(exit_code)
}

type StressRow = (u32, bool, Option<verify::StressFigures>, PathBuf);

fn print_stress_table(rows: &[StressRow]) {
    println!(
        "{:>5} {:>7} {:>10} {:>10} {:>14} {:>12} {:>12}  checks",
        "vCPUs", "threads", "exits", "exits/s", "exits/s/vCPU", "cycles/exit", "excess"
    );
    for (v, ok, f, _) in rows {
        match f {
            Some(f) => println!(
                "{:>5} {:>7} {:>10} {:>10.0} {:>14.0} {:>12.0} {:>12}  {}",
                v,
                f.threads,
                f.exits,
                f.exits_per_s,
                f.exits_per_s_per_vcpu,
                f.cycles_per_exit,
                f.excess_exits,
                if *ok { "ok" } else { "FAIL" }
            ),
            None => println!("{v:>5} {:>7} (no report)  FAIL", "-"),
        }
    }
}

/// Where the repository is: `--repo`, else the one labctl was built from.
pub fn default_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_split_by_exit() {
        let out = |t: &str| Msg::Output {
            level: Level::L2,
            stream: Stream::Stdout,
            text: t.into(),
        };
        let exited = |c| Msg::Exited {
            level: Level::L2,
            argv: vec!["p".into()],
            status: Status::Code(c),
        };
        let msgs = vec![
            out("CPUID(0x4FFFFFFF), "),
            Msg::Console {
                level: Level::L2,
                line: "noise".into(),
                t_us: None,
            },
            out("exits=1, cycles spent in exit=2\n"),
            exited(0),
            Msg::Output {
                level: Level::L1,
                stream: Stream::Stdout,
                text: "l1".into(),
            },
            out("x"),
            exited(3),
        ];
        let p = collect_programs(&msgs, Level::L2);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].stdout.trim_end().parse::<ExitStats>().unwrap(),
            ExitStats {
                exits: 1,
                cycles: 2
            }
        );
        assert_eq!(p[1].stdout, "x");
        assert_eq!(p[1].status, Some(Status::Code(3)));
    }

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
