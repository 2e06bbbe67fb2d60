//! Jobs: what labctl asks the L1 lab host to do, and what L1 asks the L2 test VM to do.
//!
//! A job travels as `/lab/job.json` inside the VM's initramfs; files it needs travel as
//! `/lab/files/<name>` next to it. The image's init (PID 1) runs the steps in order.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::cpio::{CpioError, CpioWriter};
use crate::vm::Machine;
use serde::{Deserialize, Serialize};

/// Where a job's JSON lives inside a VM.
pub const JOB_PATH: &str = "lab/job.json";
/// Where a job's files live inside a VM; programs run with this as working directory.
pub const FILES_DIR: &str = "lab/files";

/// Nesting level of a VM in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The lab host: the patched kernel with KVM built in, under QEMU on the real host.
    L1,
    /// The test VM, run by the patched KVM inside L1.
    L2,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::L1 => "L1",
            Level::L2 => "L2",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub level: Level,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Run a program (absolute path, or relative to [`FILES_DIR`]); its output streams back
    /// as [`Msg::Output`](crate::msg::Msg::Output), then [`Msg::Exited`](crate::msg::Msg::Exited).
    Run { argv: Vec<String> },
    /// Run a test program like [`Step::Run`], but its failure does not end the job: the
    /// steps after it still run (a suite of independent tests, each judged by its status).
    Test { argv: Vec<String> },
    /// Write `value` to `path`, e.g. a KVM module parameter under /sys/module/kvm/parameters.
    Write { path: String, value: String },
    /// L2 only: have L1 report the KVM statistics of this VM now, and wait until it has.
    Checkpoint { tag: String },
    /// L2 only: have L1 set one of its `kvm` module parameters
    /// (`/sys/module/kvm/parameters/<name>`), e.g. `exit_accounting`, and wait until it has.
    SetKvmParam { name: String, value: String },
    /// Do nothing for `ms` milliseconds: the guest idles (record-boot's idle phase).
    Idle { ms: u64 },
    /// L1 only: boot an L2 VM on the patched KVM and run its job there.
    Vm(VmJob),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmJob {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Names of files under [`FILES_DIR`] of L1 to copy into the L2's [`FILES_DIR`].
    pub files: Vec<String>,
    /// Extra kernel command line for L2 (e.g. `maxcpus=1`).
    #[serde(default)]
    pub kernel_args: String,
    pub job: Job,
    /// Boot this operating system from a disk instead of the lab's own image; `files`
    /// must then be empty and `job` have no steps (the guest runs its own init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_boot: Option<DiskBoot>,
    /// Sample the VM's KVM statistics while it runs (see [`Msg::Sample`](crate::msg::Msg::Sample)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Recording>,
    /// The machine of the lab's own L2 (virtio ports); a guest booted from a disk or
    /// recorded is always a PC with UARTs.
    #[serde(default)]
    pub machine: Machine,
}

/// An L2 guest of its own: a kernel and initramfs (files under L1's [`FILES_DIR`]) and a
/// disk (a block device of L1) that becomes L2's first virtio disk, `/dev/vda`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskBoot {
    pub kernel: String,
    pub initrd: String,
    pub disk: String,
    /// The guest kernel's whole command line.
    pub cmdline: String,
}

/// How L1 samples the VM's statistics while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recording {
    /// Sampling interval in milliseconds (at least 1).
    pub interval_ms: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job is not valid JSON for this version of the lab: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("job for {found} delivered to {expected}")]
    WrongLevel { expected: Level, found: Level },
    #[error("step {index} ({step}) cannot run in {level}")]
    Misplaced {
        index: usize,
        step: &'static str,
        level: Level,
    },
    #[error("step {0}: empty argv")]
    EmptyArgv(usize),
    #[error("step {index}: {name:?} is not a kvm module parameter name")]
    BadParam { index: usize, name: String },
    #[error("step {0}: a VM booted from a disk runs its own init: no files and no steps")]
    DiskBootWithJob(usize),
    #[error("step {0}: a recording interval must be at least 1 ms")]
    ZeroInterval(usize),
}

impl Job {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("jobs always serialize")
    }

    /// Writes the job and the files it runs with into an image: each `(name, source)` as
    /// `lab/files/<name>` with the source's mode, then `lab/job.json`. labctl appends a
    /// run's job to L1's image so, and L1's init writes L2's.
    pub fn write_into<W: Write>(
        &self,
        w: &mut CpioWriter<W>,
        files: &[(String, &Path)],
    ) -> Result<(), CpioError> {
        w.dir(FILES_DIR)?;
        for (name, src) in files {
            let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", src.display()));
            let mode = std::fs::metadata(src).map_err(named)?.permissions().mode();
            w.file_from(&format!("{FILES_DIR}/{name}"), mode, src)?;
        }
        w.file(JOB_PATH, 0o644, self.to_json().as_bytes())
    }

    /// Parses and validates a job delivered to a VM at `level`.
    pub fn parse(text: &str, level: Level) -> Result<Job, JobError> {
        let job: Job = serde_json::from_str(text)?;
        job.validate(level)?;
        Ok(job)
    }

    pub fn validate(&self, level: Level) -> Result<(), JobError> {
        if self.level != level {
            return Err(JobError::WrongLevel {
                expected: level,
                found: self.level,
            });
        }
        for (index, step) in self.steps.iter().enumerate() {
            let misplaced = |step| JobError::Misplaced { index, step, level };
            match step {
                Step::Run { argv } | Step::Test { argv } if argv.is_empty() => {
                    return Err(JobError::EmptyArgv(index))
                }
                Step::Checkpoint { .. } if level != Level::L2 => {
                    return Err(misplaced("checkpoint"))
                }
                Step::SetKvmParam { .. } if level != Level::L2 => {
                    return Err(misplaced("set_kvm_param"))
                }
                Step::SetKvmParam { name, .. } if !is_param_name(name) => {
                    return Err(JobError::BadParam {
                        index,
                        name: name.clone(),
                    })
                }
                Step::Vm(vm) => {
                    if level != Level::L1 {
                        return Err(misplaced("vm"));
                    }
                    vm.job.validate(Level::L2)?;
                    if vm.disk_boot.is_some() && !(vm.files.is_empty() && vm.job.steps.is_empty()) {
                        return Err(JobError::DiskBootWithJob(index));
                    }
                    if vm.record.is_some_and(|r| r.interval_ms == 0) {
                        return Err(JobError::ZeroInterval(index));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A module parameter name: lowercase letters, digits and `_` (so it cannot escape
/// `/sys/module/kvm/parameters`).
pub fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Where L1 writes a [`Step::SetKvmParam`].
pub fn kvm_param_path(name: &str) -> Option<String> {
    is_param_name(name).then(|| format!("/sys/module/kvm/parameters/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_job() -> Job {
        Job {
            level: Level::L1,
            steps: vec![Step::Vm(VmJob {
                vcpus: 1,
                memory_mib: 256,
                files: vec![],
                kernel_args: String::new(),
                machine: Machine::Microvm,
                job: Job {
                    level: Level::L2,
                    steps: vec![
                        Step::Run {
                            argv: vec!["/guest/test_assignment2".into()],
                        },
                        Step::Checkpoint { tag: "1".into() },
                    ],
                },
                disk_boot: None,
                record: Some(Recording { interval_ms: 50 }),
            })],
        }
    }

    #[test]
    fn a_job_and_its_files_go_into_the_image_with_their_modes() {
        let dir = std::env::temp_dir().join(format!("job-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("prog");
        std::fs::write(&prog, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o750)).unwrap();
        let job = lab_job();
        let mut w = CpioWriter::new(Vec::new());
        job.write_into(&mut w, &[("mytest".into(), prog.as_path())])
            .unwrap();
        let entries = crate::cpio::read_entries(&w.finish().unwrap()).unwrap();
        let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(find(FILES_DIR).mode & 0o170000, 0o040000);
        let f = find("lab/files/mytest");
        assert_eq!(
            (f.mode & 0o7777, f.data.as_slice()),
            (0o750, &b"#!/bin/sh\n"[..])
        );
        let j = Job::parse(
            std::str::from_utf8(&find(JOB_PATH).data).unwrap(),
            Level::L1,
        );
        assert_eq!(j.unwrap(), job);
        // A missing file names itself.
        let mut w = CpioWriter::new(Vec::new());
        let e = job
            .write_into(&mut w, &[("gone".into(), dir.join("gone").as_path())])
            .unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn disk_boots_carry_no_job_and_intervals_are_positive() {
        let mut job = lab_job();
        let Step::Vm(vm) = &mut job.steps[0] else {
            unreachable!()
        };
        vm.disk_boot = Some(DiskBoot {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            disk: "/dev/vda".into(),
            cmdline: "root=/dev/vda".into(),
        });
        assert!(matches!(
            job.validate(Level::L1),
            Err(JobError::DiskBootWithJob(0))
        ));
        let Step::Vm(vm) = &mut job.steps[0] else {
            unreachable!()
        };
        vm.job.steps.clear();
        job.validate(Level::L1).unwrap();
        assert_eq!(Job::parse(&job.to_json(), Level::L1).unwrap(), job);
        let Step::Vm(vm) = &mut job.steps[0] else {
            unreachable!()
        };
        vm.record = Some(Recording { interval_ms: 0 });
        assert!(matches!(
            job.validate(Level::L1),
            Err(JobError::ZeroInterval(0))
        ));
    }

    #[test]
    fn round_trips_and_validates() {
        let job = lab_job();
        assert_eq!(Job::parse(&job.to_json(), Level::L1).unwrap(), job);
    }

    #[test]
    fn rejects_misplaced_steps_and_levels() {
        let job = lab_job();
        assert!(matches!(
            Job::parse(&job.to_json(), Level::L2),
            Err(JobError::WrongLevel { .. })
        ));
        let bad = Job {
            level: Level::L1,
            steps: vec![Step::Checkpoint { tag: "x".into() }],
        };
        assert!(matches!(
            bad.validate(Level::L1),
            Err(JobError::Misplaced { .. })
        ));
        let empty = Job {
            level: Level::L1,
            steps: vec![Step::Run { argv: vec![] }],
        };
        assert!(matches!(
            empty.validate(Level::L1),
            Err(JobError::EmptyArgv(0))
        ));
        let tests = Job {
            level: Level::L1,
            steps: vec![
                Step::Test {
                    argv: vec!["./a".into()],
                },
                Step::Test { argv: vec![] },
            ],
        };
        assert!(matches!(
            tests.validate(Level::L1),
            Err(JobError::EmptyArgv(1))
        ));
        let one = Job {
            level: Level::L1,
            steps: vec![Step::Test {
                argv: vec!["./a".into()],
            }],
        };
        assert_eq!(Job::parse(&one.to_json(), Level::L1).unwrap(), one);
    }

    #[test]
    fn kvm_params_are_names_not_paths() {
        assert_eq!(
            kvm_param_path("exit_accounting").as_deref(),
            Some("/sys/module/kvm/parameters/exit_accounting")
        );
        for bad in ["", "../../../etc/passwd", "Exit", "a/b", "a b"] {
            assert_eq!(kvm_param_path(bad), None, "{bad:?}");
            let job = Job {
                level: Level::L2,
                steps: vec![Step::SetKvmParam {
                    name: bad.into(),
                    value: "N".into(),
                }],
            };
            assert!(matches!(
                job.validate(Level::L2),
                Err(JobError::BadParam { .. })
            ));
        }
    }

    #[test]
    fn rejects_unknown_fields() {
        let text = r#"{"level":"l1","steps":[],"extra":1}"#;
        assert!(matches!(
            Job::parse(text, Level::L1),
            Err(JobError::Parse(_))
        ));
    }
}
