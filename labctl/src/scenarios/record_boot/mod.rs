//! `labctl record-boot`: a VM's exits across a whole boot, sampled by L1 while L2 boots,
//! split into phases by the guest's console, checked against the guest's own reading, and
//! written out as CSV, YAML and a plot.
//!
//! Clock: L1's monotonic clock, zero when L1 started L2's QEMU. L1 timestamps every sample
//! and every console line it relays on that one clock, so phases and samples line up.
//! Phases start at the first console line that marks them:
//!
//! | phase     | from                                                 | marker |
//! |-----------|------------------------------------------------------|--------|
//! | firmware  | KVM created the VM (its debugfs directory appeared)   | |
//! | kernel    | the kernel's banner                                   | `Linux version ` |
//! | userspace | the kernel starts the first process                   | `Run /init as init process` (or `/sbin/init`, …) |
//! | idle      | boot done: the guest's CPUID reading was taken         | checkpoint `boot-done` |
//! | shutdown  | the guest idled for `--idle` seconds                   | checkpoint `idle-end` |
//! | (end)     | the VM's QEMU exited                                  | |
//!
//! The guest reads CPUID 0x4FFFFFFF between two checkpoints at which L1 samples the same
//! counters: `exits(boot-done-before) < EAX <= exits(boot-done)` (the reading counts its
//! own exit; every other exit between the two checkpoints is the guest reporting on its
//! serial port).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use exitlab_proto::job::{DiskBoot, Job, Level, Recording, Step, VmJob};
use exitlab_proto::msg::{Msg, STAT_EXITS, STAT_EXIT_CYCLES};
use exitlab_proto::vm::{l1, Disk, DiskWrites, Machine};
use serde::Serialize;

use crate::cli::{Global, LabArgs};
use crate::debian;
use crate::engine::{self, Lab};
use crate::error::setup;
use crate::images::UserFile;
use crate::progress;
use crate::verify;

mod checks;
mod csv;
mod plot;
mod series;
mod summary;
mod tables;
#[cfg(test)]
mod testdata;

use checks::{checks, idle_check, reason_sum_check};
use series::{events, phases, reasons_between, secs, Point, Recorded, AFTER, BEFORE, IDLE_END};
use summary::{sample_bytes, Summary, Totals};
use tables::print_table;

#[derive(Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub lab: LabArgs,
    /// The guest that boots: the lab's minimal L2, or Debian (debootstrap; built once, needs root).
    #[arg(long, value_enum, default_value = "minimal")]
    pub guest: Guest,
    /// Sampling interval in milliseconds.
    #[arg(long, value_name = "MS", default_value = "20")]
    pub interval: u32,
    /// Seconds the booted guest idles before it shuts down (the plot's idle phase).
    #[arg(long, value_name = "SECONDS", default_value = "5")]
    pub idle: u32,
    /// Output directory for samples.csv, summary.yaml, exits.svg, exits.png
    /// (default: build/record-boot/<guest>-<N>vcpu).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Memory of the Debian guest unless --memory says otherwise, and what L1 then needs.
const DEBIAN_MEMORY_MIB: u32 = 1024;
const DEBIAN_L1_MEMORY_MIB: u32 = 1792;

impl RecordArgs {
    pub fn run(mut self, g: &Global) -> Result<i32> {
        if self.guest == Guest::Debian && self.lab.common.memory.is_none() {
            self.lab.common.memory = Some(DEBIAN_MEMORY_MIB);
            self.lab.common.l1_memory = self.lab.common.l1_memory.or(Some(DEBIAN_L1_MEMORY_MIB));
        }
        let lab = g.lab(self.lab)?;
        record_boot(
            &lab,
            &RecordRequest {
                guest: self.guest,
                interval_ms: self.interval,
                idle_s: self.idle,
                out: self.out,
            },
        )
    }
}

pub const SCHEMA: &str = "kvm-exit-lab/record-boot/v1";
/// Longest idle period accepted, in seconds.
pub const MAX_IDLE_S: u32 = 3600;
/// Largest sampling interval accepted, in ms: beyond it a boot is a handful of points.
pub const MAX_INTERVAL_MS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    /// The lab's own L2: the lab kernel, an initramfs, the lab's init.
    Minimal,
    /// Debian (debootstrap), Debian's kernel and initramfs, systemd, root on virtio.
    Debian,
}

impl Guest {
    pub fn name(self) -> &'static str {
        match self {
            Guest::Minimal => "minimal",
            Guest::Debian => "debian",
        }
    }
}

pub struct RecordRequest {
    pub guest: Guest,
    pub interval_ms: u32,
    /// Seconds the booted guest idles before it shuts down.
    pub idle_s: u32,
    pub out: Option<PathBuf>,
}

/// Checks the output directory can be written, before anything boots.
pub fn prepare_out(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| {
        setup(format!(
            "cannot create the output directory {}: {e}; pass --out with a writable directory",
            dir.display()
        ))
    })?;
    let probe = dir.join(".labctl-write-test");
    fs::write(&probe, b"").map_err(|e| {
        setup(format!(
            "the output directory {} is not writable: {e}; pass --out with a writable directory",
            dir.display()
        ))
    })?;
    let _ = fs::remove_file(probe);
    Ok(())
}

fn l2_job(lab: &Lab, req: &RecordRequest, disk_boot: Option<DiskBoot>) -> Job {
    let steps = match req.guest {
        Guest::Minimal => vec![
            Step::Checkpoint { tag: BEFORE.into() },
            Step::Run {
                argv: vec![format!("{}/test_assignment2", l1::GUEST_BIN_DIR)],
            },
            Step::Checkpoint { tag: AFTER.into() },
            Step::Idle {
                ms: u64::from(req.idle_s) * 1000,
            },
            Step::Checkpoint {
                tag: IDLE_END.into(),
            },
        ],
        Guest::Debian => vec![],
    };
    Job {
        level: Level::L1,
        steps: vec![Step::Vm(VmJob {
            vcpus: lab.cfg.l2_vcpus,
            memory_mib: lab.cfg.l2_memory_mib,
            files: vec![],
            kernel_args: "earlyprintk=serial,ttyS0,115200".into(),
            job: Job {
                level: Level::L2,
                steps,
            },
            disk_boot,
            record: Some(Recording {
                interval_ms: req.interval_ms,
            }),
            // A recorded guest is a PC with UARTs, whatever this says.
            machine: Machine::Pc,
        })],
    }
}

/// L1's tick for the Debian guest: periodic (no high-resolution timers, no dynamic tick),
/// so that L1's APIC timer fires every tick by itself. QEMU 7.2's emulated SVM can lose the
/// request to deliver L1's timer interrupt (`do_vmexit()` clears a bit of the vCPU's
/// `interrupt_request` without the BQL, racing the APIC's; fixed upstream after QEMU 10.1),
/// and L1's one-shot timer is then never re-armed until another interrupt comes: L1 stood
/// still for up to 1.2 s in about one Debian boot in ten, whose 10 000-15 000 I/O exits a
/// second make the race likely. With a periodic tick a lost request costs one tick (4 ms).
/// docs/measurements.md, "Reliability".
const DEBIAN_L1_TICK: &str = "highres=off nohz=off";

/// `labctl record-boot`.
pub fn record_boot(lab: &Lab, req: &RecordRequest) -> Result<i32> {
    if req.interval_ms == 0 || req.interval_ms > MAX_INTERVAL_MS {
        return Err(setup(format!(
            "--interval {} ms: give a sampling interval from 1 to {MAX_INTERVAL_MS} ms (default 20)",
            req.interval_ms
        )));
    }
    let out = req.out.clone().unwrap_or_else(|| {
        lab.cfg.build_dir.join("record-boot").join(format!(
            "{}-{}vcpu",
            req.guest.name(),
            lab.cfg.l2_vcpus
        ))
    });
    if req.idle_s > MAX_IDLE_S {
        return Err(setup(format!(
            "--idle {} s: give 0 to {MAX_IDLE_S} seconds",
            req.idle_s
        )));
    }
    prepare_out(&out)?;
    // The plot's font, before anything boots: a missing one is a setup error, not a
    // boot's worth of samples without their picture.
    plot::fonts()?;
    let mut p = lab.build()?;
    if req.guest == Guest::Debian {
        p.l1_cmdline_base = engine::l1_cmdline(&p.l1_cmdline_base, DEBIAN_L1_TICK);
    }
    let (job, files, disks) = match req.guest {
        Guest::Minimal => (l2_job(lab, req, None), vec![], vec![]),
        Guest::Debian => {
            let boot_done = lab
                .artifacts
                .guest_dir
                .clone()
                .unwrap_or_else(|| lab.cfg.build_dir.join("guest"))
                .join("boot-done");
            let img = debian::image(&lab.sh, &lab.cfg.build_dir, &boot_done)?;
            let files = vec![
                UserFile::named(&img.kernel, "vmlinuz")?,
                UserFile::named(&img.initrd, "initrd.img")?,
            ];
            let disk = DiskBoot {
                kernel: "vmlinuz".into(),
                initrd: "initrd.img".into(),
                disk: "/dev/vda".into(),
                cmdline: format!("{} exitlab.idle_ms={}", debian::CMDLINE, req.idle_s * 1000),
            };
            // One image serves every boot: what the guest writes is dropped with L1.
            let disk_image = Disk {
                path: img.disk.display().to_string(),
                writes: DiskWrites::Discarded,
            };
            (l2_job(lab, req, Some(disk)), files, vec![disk_image])
        }
    };
    progress::note(
        "record",
        format!(
            "{} guest, {} vCPU(s), {} MiB, a sample every {} ms, {} s idle after boot; output: {}",
            req.guest.name(),
            lab.cfg.l2_vcpus,
            lab.cfg.l2_memory_mib,
            req.interval_ms,
            req.idle_s,
            out.display()
        ),
    );
    let mut msgs: Vec<Msg> = Vec::new();
    let run = lab.run_with(&p, "record-boot", &job, &files, disks, |m| {
        if let Msg::Console {
            level: Level::L2,
            line,
            t_us: Some(t),
        } = m
        {
            if series::marks_an_event(line) {
                progress::note("record", format!("{:>8.2} s  {}", secs(*t), line.trim()));
            }
        }
        msgs.push(m.clone());
    });
    let (run, error) = match run {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let r = Recorded::from_msgs(&msgs);
    let e = events(&r);
    let phases = phases(&r, &e);
    let mut checks = checks(&r, &e, req.interval_ms);
    if let Some(run) = &run {
        checks.insert(0, run.ran_check());
        checks.push(run.no_stalls());
    }
    checks.push(reason_sum_check(&r, lab.cfg.l2_vcpus));
    if let Some(c) = idle_check(&phases, req.idle_s) {
        checks.push(c);
    }
    let files_out = BTreeMap::from([
        ("csv", out.join("samples.csv")),
        ("yaml", out.join("summary.yaml")),
        ("svg", out.join("exits.svg")),
        ("png", out.join("exits.png")),
    ]);
    fs::write(&files_out["csv"], csv::csv(&r, &e))?;
    let title = format!(
        "VM exits during a full boot: {} guest, {} vCPU{}",
        req.guest.name(),
        lab.cfg.l2_vcpus,
        if lab.cfg.l2_vcpus == 1 { "" } else { "s" }
    );
    let plotted = plot::write(
        &title,
        &r,
        &e,
        &phases,
        &files_out["svg"],
        &files_out["png"],
    );
    let complete = error.is_none() && e.boot_done_us.is_some() && e.vm_exited_us.is_some();
    let last = r.points.last();
    let seconds = match (e.vm_created_us, last) {
        (Some(c), Some(l)) => secs(l.t_us.saturating_sub(c)),
        _ => 0.0,
    };
    let summary = Summary {
        schema: SCHEMA,
        guest: req.guest.name(),
        l2_kernel: run.as_ref().and_then(|r| r.kernel(Level::L2)),
        vcpus: lab.cfg.l2_vcpus,
        memory_mib: lab.cfg.l2_memory_mib,
        interval_ms: req.interval_ms,
        idle_s: req.idle_s,
        complete,
        error: error.as_ref().map(|e| format!("{e:#}")),
        samples: r.points.len(),
        events_s: [
            ("vm_created", e.vm_created_us),
            ("kernel", e.kernel_us),
            ("userspace", e.userspace_us),
            ("login_ready", e.login_ready_us),
            ("boot_done", e.boot_done_us),
            ("idle_end", e.idle_end_us),
            ("vm_exited", e.vm_exited_us),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, secs(v))))
        .collect(),
        totals: Totals {
            exits: last.map_or(0, |p| p.get(STAT_EXITS)),
            exit_cycles: last.map_or(0, |p| p.get(STAT_EXIT_CYCLES)),
            seconds,
            reasons: last.map_or(vec![], |z| reasons_between(&Point::default(), z)),
        },
        sample_bytes: sample_bytes(&msgs, seconds),
        phases: &phases,
        guest_reading: r.reading_line.as_deref().and_then(|l| l.parse().ok()),
        kvm_exit_tracepoint: "not recorded: the lab's L1 kernel is built without tracing (CONFIG_FTRACE), to keep it small and its exit path unchanged; exit kinds come from KVM's own per-kind counters",
        checks: &checks,
        files: files_out.clone(),
        logs: run.as_ref().map(|r| r.dir.clone()),
    };
    fs::write(&files_out["yaml"], serde_yaml_ng::to_string(&summary)?)?;
    print_table(&summary, &phases, &checks, &files_out);
    if let Some(err) = error {
        eprintln!(
            "record-boot: the boot did not finish; the partial series ({} samples) is kept, marked incomplete, in {}",
            r.points.len(),
            out.display()
        );
        return Err(err);
    }
    if let Err(e) = plotted {
        return Err(setup(format!(
            "{e:#}\n  (the CSV and YAML are written in {})",
            out.display()
        )));
    }
    if !complete {
        // The boot ran, but the guest stopped before the end (its QEMU exited or the
        // protocol went quiet): a crashed VM, not a failed check on a finished boot.
        let why = run
            .as_ref()
            .and_then(|r| r.l2_vanished())
            .unwrap_or_else(|| "it never reported boot done".into());
        eprintln!(
            "record-boot: the guest stopped before the end of its boot ({why}); the partial series ({} samples) is kept, marked incomplete, in {}",
            r.points.len(),
            out.display()
        );
        return Ok(crate::error::code::VM_CRASHED.into());
    }
    Ok(crate::error::code::of_checks(verify::all_ok(&checks)))
}

#[cfg(test)]
mod tests {
    use super::checks::reason_sum_check;
    use super::testdata::boot;
    use super::*;

    #[test]
    fn unwritable_output_is_refused() {
        let e = prepare_out(Path::new("/proc/no-such-dir/out")).unwrap_err();
        assert!(format!("{e}").contains("--out"), "{e}");
    }

    #[test]
    fn reasons_are_rebuilt_in_time_order_from_what_changed() {
        let s = |t_ms: u64, exits: u64, r: Vec<[u64; 3]>| Msg::Sample {
            t_us: t_ms * 1000,
            tag: None,
            v: exitlab_proto::msg::sample_values(&[(STAT_EXITS.to_string(), exits)].into()),
            r,
        };
        // The checkpoint thread's sample (read second) arrives before the periodic one.
        // KVM lists no reason before the VM's first exit.
        let m = [
            s(5, 0, vec![]),
            s(10, 3, vec![[10, 1, 10], [30, 2, 20]]),
            s(30, 6, vec![[30, 5, 50]]),
            s(20, 4, vec![[10, 2, 15]]),
        ];
        let r = Recorded::from_msgs(&m);
        let t: Vec<(u64, u64)> = r.points[1..]
            .iter()
            .map(|p| (p.reasons[&10].exits, p.reasons[&30].exits))
            .collect();
        assert_eq!(t, vec![(1, 2), (2, 2), (2, 5)]);
        assert!(reason_sum_check(&r, 1).ok);
        // Exits but no reasons: the per-reason file went missing.
        let m = [s(10, 3, vec![[10, 1, 10], [30, 2, 20]]), s(20, 4, vec![])];
        let mut r = Recorded::from_msgs(&m);
        r.points[1].reasons.clear();
        let c = reason_sum_check(&r, 1);
        assert!(
            !c.ok && c.detail.contains("1 of 2 samples with exits"),
            "{c:?}"
        );
        // A sum below its sample's exit count (an exit counted only in stat.exits) fails.
        let m = [s(10, 3, vec![[10, 1, 10], [30, 1, 20]]), s(20, 3, vec![])];
        let c = reason_sum_check(&Recorded::from_msgs(&m), 1);
        assert!(!c.ok && c.detail.contains("2 by reason, exits 3"), "{c:?}");
        // Above the next sample's count plus one in flight per vCPU.
        let m = [s(10, 3, vec![[10, 3, 10], [30, 3, 20]]), s(20, 4, vec![])];
        assert!(!reason_sum_check(&Recorded::from_msgs(&m), 1).ok);
        assert!(reason_sum_check(&Recorded::from_msgs(&m), 2).ok);
        // No per-reason counters at all: not the lab's KVM.
        let m = [s(10, 3, vec![]), s(20, 4, vec![])];
        let c = reason_sum_check(&Recorded::from_msgs(&m), 1);
        assert!(!c.ok && c.detail.contains("patched KVM"), "{c:?}");
    }

    #[test]
    fn phases_by_reason_sum_to_the_phase_and_sort_by_exits() {
        let r = Recorded::from_msgs(&boot());
        let ph = phases(&r, &events(&r));
        for p in &ph {
            let sum: u64 = p.reasons.iter().map(|r| r.exits).sum();
            assert_eq!(sum, p.exits, "{p:?}");
        }
        // kernel: 100 -> 3000 exits: CPUID 25 -> 750, I/O 75 -> 2250.
        let k = &ph[1].reasons;
        assert_eq!(
            (k[0].name, k[0].exits, k[0].cycles),
            ("IO_INSTRUCTION", 2175, 217_500)
        );
        assert_eq!((k[1].name, k[1].exits), ("CPUID", 725));
        assert!((k[0].exits_pct - 75.0).abs() < 0.1 && (k[1].cycles_pct - 25.0).abs() < 0.1);
        let csv = csv::csv(&r, &events(&r));
        let head = csv.lines().next().unwrap();
        assert!(
            head.ends_with(",cpuid_exits,cpuid_cycles,io_instruction_exits,io_instruction_cycles"),
            "{head}"
        );
        assert!(
            csv.lines().nth(2).unwrap().ends_with(",25,2500,75,7500"),
            "{csv}"
        );
    }
}
