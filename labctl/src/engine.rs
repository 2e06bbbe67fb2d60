//! The engine every scenario runs on: a `Lab` (the resolved configuration), its build
//! (kernel, guest programs, L1 image), a boot of L1 with a job, and what came back
//! (programs' output, KVM's statistics at checkpoints, the results' common part).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::Result;
use exitlab_proto::job::{Job, Level, Step, VmJob};
use exitlab_proto::msg::{Msg, Status, Stream, VmStats};
use exitlab_proto::vm::{l1, Disk, Machine};
use xshell::Shell;

use crate::accel::{self, AccelDecision, HostFacts};
use crate::boot::{self, BootResult, L1Vm, RunLogs};
use crate::config::LabConfig;
use crate::doctor::{self, Need};
use crate::error::code;
use crate::images::{self, Artifacts, UserFile};
use crate::kernel::{self, BuildInfo, KernelDirs, KernelInputs};
use crate::report::{AccelReport, Results, StatsReport, Timings, VmReport};
use crate::verify::{self, Check};

/// Everything a scenario needs before it boots.
#[derive(Clone)]
pub struct Lab {
    /// The command's one shell (`cli::Global`).
    pub sh: Rc<Shell>,
    /// The build directory's lock, held while this labctl uses it.
    pub _lock: std::sync::Arc<crate::lock::BuildLock>,
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
            cfg,
            ..self.clone()
        })
    }

    /// The same lab with `extra` appended to L1's kernel command line.
    pub fn with_l1_cmdline(&self, extra: &str) -> Lab {
        Lab {
            l1_cmdline: l1_cmdline(&self.l1_cmdline, extra),
            ..self.clone()
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
                    &self.sh,
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
                    None => images::build_guest(&self.sh, &self.repo, &self.cfg.build_dir)?,
                };
                images::l1_base_image(&self.sh, &self.cfg.build_dir, &kernel, &guest, &selftest)?
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

    /// As [`Lab::run`], with disks for L1 (e.g. the image of a guest L2 boots from).
    pub fn run_with(
        &self,
        p: &Prepared,
        scenario: &str,
        job: &Job,
        files: &[UserFile],
        disks: Vec<Disk>,
        on_msg: impl FnMut(&Msg),
    ) -> Result<Run> {
        let dir = boot::new_run_dir(&self.cfg.build_dir, scenario)?;
        let logs = RunLogs::new(&dir);
        let initrd = dir.join("initrd.cpio");
        let started = std::time::Instant::now();
        images::run_initrd(&p.image, job, files, &initrd)?;
        let image = started.elapsed();
        let vm = boot::l1_vm(
            L1Vm {
                qemu: &p.qemu,
                accel: &p.accel,
                vcpus: self.cfg.l1_vcpus(p.accel.accel),
                memory_mib: self.cfg.l1_memory_mib,
                kernel: &p.kernel,
                initrd: &initrd,
                cmdline: &l1_cmdline(&p.l1_cmdline_base, &self.l1_cmdline),
                disks,
            },
            &logs,
        );
        let result = boot::boot(&self.sh, &vm, self.cfg.timeout, &logs, on_msg);
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
            kvm_stats: run
                .stats()
                .iter()
                .map(|(k, v)| (k.clone(), StatsReport::from(v)))
                .collect(),
            checks,
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
            body: None,
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
    use exitlab_proto::leaf::ExitStats;

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
}
