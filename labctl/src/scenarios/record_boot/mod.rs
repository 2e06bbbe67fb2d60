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
                progress::note(
                    "record",
                    format!("{:>8.2} s  {}", series::secs(*t), line.trim()),
                );
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
    Ok(if verify::all_ok(&checks) {
        0
    } else {
        crate::error::code::SCENARIO_FAILED.into()
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::checks::interval_check;
    use super::series::{Phase, PHASES};
    use super::*;
    use exitlab_proto::msg::Stream;

    #[test]
    fn idle_must_last_what_was_asked() {
        let phase = |name, start_s, end_s| Phase {
            name,
            start_s,
            end_s,
            exits: 0,
            exit_cycles: 0,
            exits_per_s: 0.0,
            peak_exits_per_s: 0.0,
            kinds: BTreeMap::new(),
            reasons: vec![],
        };
        let ok = |start, end, asked| {
            idle_check(
                &[phase("kernel", 0.0, 1.0), phase("idle", start, end)],
                asked,
            )
            .unwrap()
            .ok
        };
        assert!(ok(6.65, 11.70, 5));
        assert!(!ok(6.65, 45.0, 5), "a guest that slept on");
        assert!(!ok(6.0, 10.0, 5), "a short idle");
        assert!(ok(2.0, 3.08, 1));
        assert!(idle_check(&[phase("kernel", 0.0, 1.0)], 5).is_none());
    }

    fn point(t_ms: u64, exits: u64, tag: Option<&str>) -> Msg {
        Msg::Sample {
            t_us: t_ms * 1000,
            tag: tag.map(String::from),
            v: exitlab_proto::msg::sample_values(
                &[
                    (STAT_EXITS.to_string(), exits),
                    (STAT_EXIT_CYCLES.to_string(), exits * 100),
                    ("io_exits".to_string(), exits / 2),
                ]
                .into(),
            ),
            // A quarter CPUID, the rest I/O; every sample carries both (unchanged ones too,
            // which is harmless).
            r: vec![
                [10, exits / 4, exits * 25],
                [30, exits - exits / 4, exits * 75],
            ],
        }
    }

    fn console(t_ms: u64, line: &str) -> Msg {
        Msg::Console {
            level: Level::L2,
            line: line.into(),
            t_us: Some(t_ms * 1000),
        }
    }

    pub(super) fn boot() -> Vec<Msg> {
        vec![
            Msg::VmCreated { created_us: 10_000 },
            point(10, 0, None),
            point(60, 100, None),
            console(70, "Linux version 6.12.117"),
            point(110, 1000, None),
            point(160, 3000, None),
            console(170, "Run /init as init process"),
            point(210, 4000, None),
            point(215, 4100, Some(BEFORE)),
            Msg::Output {
                level: Level::L2,
                stream: Stream::Stdout,
                text: "CPUID(0x4FFFFFFF), exits=4101, cycles spent in exit=410050\n".into(),
            },
            point(220, 4200, Some(AFTER)),
            point(240, 4250, None),
            point(250, 4260, Some(IDLE_END)),
            point(260, 4300, None),
            Msg::VmExited {
                status: exitlab_proto::msg::Status::Code(0),
                t_us: Some(280_000),
            },
        ]
    }

    #[test]
    fn phases_split_the_series_at_the_markers() {
        let r = Recorded::from_msgs(&boot());
        let e = events(&r);
        assert_eq!(e.kernel_us, Some(70_000));
        assert_eq!(e.userspace_us, Some(170_000));
        assert_eq!(e.boot_done_us, Some(220_000));
        let ph = phases(&r, &e);
        let names: Vec<_> = ph.iter().map(|p| p.name).collect();
        assert_eq!(names, PHASES);
        // Values at a boundary are the last sample at or before it.
        assert_eq!(ph[0].exits, 100); // 0 at 10 ms .. 100 at 60 ms
        assert_eq!(ph[1].exits, 2900); // 100 .. 3000 at 160 ms
        assert_eq!(ph[2].exits, 1200); // 3000 .. 4200 at 220 ms
        assert_eq!(ph[3].exits, 60); // 4200 .. 4260 at 250 ms
        assert_eq!(ph[4].exits, 40);
        assert_eq!(ph[1].kinds["io_exits"], 1450);
        assert!((ph[1].peak_exits_per_s - 40_000.0).abs() < 1e-6);
        let total: u64 = ph.iter().map(|p| p.exits).sum();
        assert_eq!(total, 4300);
    }

    #[test]
    fn a_good_series_passes_every_check() {
        let r = Recorded::from_msgs(&boot());
        let c = checks(&r, &events(&r), 50);
        assert!(verify::all_ok(&c), "{c:#?}");
        let c = reason_sum_check(&r, 1);
        assert!(c.ok, "{c:?}");
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
    fn bad_series_fail_with_reasons() {
        // A counter going backwards.
        let mut m = boot();
        m.insert(5, point(120, 900, None));
        let r = Recorded::from_msgs(&m);
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "monotonic" && !c.ok));
        // A reading outside its checkpoints.
        let m: Vec<Msg> = boot()
            .into_iter()
            .map(|m| match m {
                Msg::Output { level, stream, .. } => Msg::Output {
                    level,
                    stream,
                    text: "CPUID(0x4FFFFFFF), exits=4100, cycles spent in exit=410050\n".into(),
                },
                m => m,
            })
            .collect();
        let r = Recorded::from_msgs(&m);
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "guest-reading" && !c.ok));
        // A boot that never got to userspace: phases missing, the rest still sliced.
        let m: Vec<Msg> = boot().into_iter().take(6).collect();
        let r = Recorded::from_msgs(&m);
        let e = events(&r);
        let c = checks(&r, &e, 50);
        let phases_check = c.iter().find(|c| c.name == "phases").unwrap();
        assert!(!phases_check.ok);
        assert!(phases_check.detail.contains("first process"));
        assert_eq!(phases(&r, &e).len(), 2);
        // A sample of a VM being destroyed (no exit count) is not a reading.
        let mut m = boot();
        m.push(Msg::Sample {
            t_us: 290_000,
            tag: None,
            v: exitlab_proto::msg::sample_values(&[("io_exits".to_string(), 1)].into()),
            r: vec![],
        });
        let r = Recorded::from_msgs(&m);
        assert_eq!(r.points.last().unwrap().get(STAT_EXITS), 4300);
        // A counter that vanishes from one sample to the next is flagged.
        let mut r = Recorded::from_msgs(&boot());
        r.points[3].stats.remove("io_exits");
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "monotonic" && !c.ok));
        // A sampler off its schedule.
        let r = Recorded::from_msgs(&boot());
        let c = checks(&r, &events(&r), 20);
        assert!(c.iter().any(|c| c.name == "interval" && !c.ok));
    }

    #[test]
    fn the_interval_check_counts_missed_ticks_and_fails_a_drifting_sampler() {
        let steady: Vec<u64> = (0..200).map(|i| i * 20_000).collect();
        assert!(interval_check(&steady, 20).ok);
        // One missed tick in 200: counted, not failed.
        let missed: Vec<u64> = steady.iter().copied().filter(|t| *t != 2_000_000).collect();
        let c = interval_check(&missed, 20);
        assert!(c.ok && c.detail.contains("1 of 198"), "{}", c.detail);
        // Every fifth tick missed: fails.
        let bad: Vec<u64> = steady
            .iter()
            .copied()
            .filter(|t| t % 100_000 != 0)
            .collect();
        assert!(!interval_check(&bad, 20).ok);
        // Sampling at 30 ms when 20 was asked: fails.
        let slow: Vec<u64> = (0..100).map(|i| i * 30_000).collect();
        assert!(!interval_check(&slow, 20).ok);
        assert!(!interval_check(&[5], 20).ok);
    }

    #[test]
    fn csv_has_a_row_per_sample_with_phase_and_rate() {
        let r = Recorded::from_msgs(&boot());
        let text = csv::csv(&r, &events(&r));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "t_s,phase,tag,exits,exit_cycles,exits_per_s,io_exits,cpuid_exits,cpuid_cycles,io_instruction_exits,io_instruction_cycles"
        );
        assert_eq!(lines.len(), 1 + r.points.len());
        assert_eq!(lines[1], "0.010000,firmware,,0,0,,0,0,0,0,0");
        assert_eq!(
            lines[3],
            "0.110000,kernel,,1000,100000,18000,500,250,25000,750,75000"
        );
        assert!(lines[7].starts_with("0.220000,idle,boot-done,4200,"));
        // A tag with a comma or a quote is quoted, and reads back whole.
        let mut r = r;
        r.points[0].tag = Some("a,\"b\"".into());
        let text = csv::csv(&r, &events(&r));
        assert!(
            text.lines().nth(1).unwrap().contains(",\"a,\"\"b\"\"\","),
            "{text}"
        );
        let mut rd = ::csv::Reader::from_reader(text.as_bytes());
        let first = rd.records().next().unwrap().unwrap();
        assert_eq!(&first[2], "a,\"b\"");
        assert_eq!(first.len(), lines[0].split(',').count());
    }

    #[test]
    fn unwritable_output_is_refused() {
        let e = prepare_out(Path::new("/proc/no-such-dir/out")).unwrap_err();
        assert!(format!("{e}").contains("--out"), "{e}");
    }
}
