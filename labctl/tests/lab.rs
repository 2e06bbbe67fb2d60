//! End-to-end tests: they build the patched kernel and the images (once; later runs are
//! incremental), boot the nested lab and assert on the values it reports. Boots are
//! serialized (the machine has few cores). A test that cannot run fails and says why.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{lab_lock, labctl, repo};
use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::SAMPLED_STATS;
use exitlab_proto::reasons::{ReasonAnswer, ReasonLine};

/// A boot that takes longer than this has hung: normal boots here take under 2 minutes.
const BOOT_TIMEOUT: &str = "300";

/// `labctl` for a run that boots the lab and expects it to finish. Hung boots are cut at
/// `BOOT_TIMEOUT` seconds and fail: the lost timer wake-ups that used to hang L2 were a
/// KVM bug, fixed in kernel/6.12/patches/0001. Nothing is run twice: a crashed VM (125, 126)
/// fails the test. (L1's vCPUs running at once under TCG crashed nested guests now and
/// then; the lab gives L1 one vCPU under TCG unless asked: docs/measurements.md, "Reliability".)
fn boot(args: &[&str]) -> Output {
    let mut args: Vec<&str> = args.to_vec();
    if !args.contains(&"--timeout") {
        let at = if args[0] == "bench" { 2 } else { 1 };
        args.splice(at..at, ["--timeout", BOOT_TIMEOUT]);
    }
    labctl(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("labctl was killed by a signal")
}

/// The results file a run printed (`results:  PATH`), parsed.
fn results(o: &Output) -> serde_yaml_ng::Value {
    let text = stdout(o) + &stderr(o);
    let path = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("results:  ")
                .or_else(|| l.split_once("results: ").map(|(_, p)| p))
        })
        .expect("labctl printed no results path")
        .trim();
    let yaml = std::fs::read_to_string(path).expect("results file");
    serde_yaml_ng::from_str(&yaml).expect("results file is YAML")
}

fn readings(o: &Output) -> Vec<ExitStats> {
    stdout(o)
        .lines()
        .filter(|l| l.starts_with("CPUID(0x4FFFFFFF)"))
        .map(|l| l.parse().expect("a line in the exact sample format"))
        .collect()
}

/// test_assignment2's two readings: nonzero, and growing from the first to the second.
fn growing_readings(o: &Output) -> Vec<ExitStats> {
    let r = readings(o);
    assert_eq!(r.len(), 2, "two readings of test_assignment2");
    assert!(r[0].exits > 0 && r[0].cycles > 0, "{r:?}");
    assert!(
        r[1].exits > r[0].exits && r[1].cycles > r[0].cycles,
        "{r:?}"
    );
    r
}

fn host_can_nest_with_kvm() -> bool {
    exitlab_proto::vm::CpuVirt::probe().any()
}

#[test]
fn lab_prints_growing_readings_that_match_kvm_statistics() {
    let _g = lab_lock();
    let o = boot(&["lab"]);
    assert_eq!(code(&o), 0, "labctl lab failed");
    let r = growing_readings(&o);

    let y = results(&o);
    assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/results/v2"));
    assert_eq!(y["ok"].as_bool(), Some(true));
    let checks = y["checks"].as_sequence().unwrap();
    let names: Vec<_> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "ran",
            "format",
            "nonzero",
            "growing",
            "matches-kvm-stats",
            "per-reason-table",
            "per-reason-sum",
            "per-reason-matches-kvm",
            "per-reason-cpuid",
            "per-vcpu-reason-sums",
            "no-stalls"
        ]
    );
    assert!(checks.iter().all(|c| c["ok"].as_bool() == Some(true)));
    // test_assignment3's walk: every SDM reason once, and the exits a booted L2 takes
    // (CPUID, HLT, I/O, nested page faults, external interrupts, MSR writes) nonzero.
    let walk: Vec<ReasonLine> = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("CPUID(0x4FFFFFFE), exit reason "))
        .map(|l| l.parse().expect("a line in test_assignment3's format"))
        .collect();
    assert_eq!(walk.len(), 1 + 78, "CPUID alone, then reasons 0..=77");
    for (reason, name) in [
        (1, "EXTERNAL_INTERRUPT"),
        (10, "CPUID"),
        (12, "HLT"),
        (30, "IO_INSTRUCTION"),
        (32, "MSR_WRITE"),
        (48, "EPT_VIOLATION"),
    ] {
        let l = walk[1..].iter().find(|l| l.reason == reason).unwrap();
        assert_eq!(l.name.as_deref(), Some(name));
        assert!(
            matches!(l.answer, ReasonAnswer::Stats(s) if s.exits > 0 && s.cycles > 0),
            "{l}"
        );
    }
    // The results file holds the same readings as stdout, and KVM's own totals bound them.
    assert_eq!(
        y["lab"]["readings"][1]["exits"].as_u64(),
        Some(u64::from(r[1].exits))
    );
    let s2 = &y["kvm_stats"]["after-2"];
    assert!(s2["exits"].as_u64().unwrap() >= u64::from(r[1].exits));
    assert!(s2["exit_cycles"].as_u64().unwrap() > r[1].cycles);
    // Default options pick the accelerator by themselves, and say why.
    let expected = if host_can_nest_with_kvm() {
        None
    } else {
        Some("tcg")
    };
    if let Some(kind) = expected {
        assert_eq!(y["accel"]["kind"].as_str(), Some(kind));
        assert_eq!(y["accel"]["cpu"].as_str(), Some("max"));
    }
    assert!(!y["accel"]["reason"].as_str().unwrap().is_empty());
    // What was built is recorded: version and one hash per patch.
    let patches = kernel_patch_count();
    assert_eq!(y["kernel"]["patches"].as_sequence().unwrap().len(), patches);
    assert!(y["kernel"]["version"].as_str().unwrap().starts_with("6.12"));
    assert!(y["l2"]["kernel"].as_str().unwrap().starts_with("6.12"));
}

/// The host's TSC rate in kHz, measured against the monotonic clock over 200 ms. Under
/// TCG, L1's TSC is the host's, so this is the rate L1 refines its calibration to.
fn host_tsc_khz() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (std::time::Instant::now(), tsc());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (t1, c1) = (t0.elapsed(), tsc());
    ((c1 - c0) as f64 / t1.as_secs_f64() / 1000.0) as u64
}

/// The L2 stalls' root cause, reproduced: an L1 whose early TSC calibration is 0.4 % below
/// the refined one makes KVM create L2's vCPUs with a TSC rate it cannot set ("user
/// requested TSC rate below hardware speed"). Without kernel/6.12/patches/0001 the vCPU's TSC
/// multiplier stayed zero, KVM's view of L2's TSC froze, and every TSC-deadline timer of
/// L2 fired seconds late (RCU stalls, a 20 s then 41 s "Long readout interval"). With it,
/// the lab passes every check, `no-stalls` included.
#[test]
fn a_tsc_rate_kvm_cannot_set_does_not_stall_l2() {
    assert!(
        !host_can_nest_with_kvm(),
        "this test reproduces a TCG-only condition (L1's TSC is the host's); with hardware KVM for L1 it does not apply: run it on a host without VT-x/AMD-V"
    );
    let _g = lab_lock();
    let khz = host_tsc_khz() * 996 / 1000;
    let arg = format!("tsc_early_khz={khz}");
    let o = boot(&["lab", "--l1-cmdline", &arg]);
    let y = results(&o);
    let l1 = std::fs::read_to_string(y["logs"]["l1_console"].as_str().unwrap()).unwrap();
    assert!(
        l1.contains("user requested TSC rate below hardware speed"),
        "the condition was not reproduced: L1 did not refuse L2's TSC rate ({arg})"
    );
    assert_eq!(code(&o), 0, "the lab failed with L2's TSC rate refused");
    let checks = y["checks"].as_sequence().unwrap();
    let stalls = checks
        .iter()
        .find(|c| c["name"].as_str() == Some("no-stalls"))
        .expect("a no-stalls check");
    assert_eq!(stalls["ok"].as_bool(), Some(true), "{stalls:?}");
}

/// `labctl lab` with `l1_cmdline` on L1's command line: the checks fail (1) and both
/// readings are zero.
fn lab_reads_zero_and_fails(l1_cmdline: &str) -> Output {
    let o = boot(&["lab", "--l1-cmdline", l1_cmdline]);
    assert_eq!(code(&o), 1, "checks must fail with {l1_cmdline}");
    let r = readings(&o);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(ExitStats::is_zero), "{r:?}");
    o
}

#[test]
fn accounting_off_makes_the_lab_fail_loudly() {
    let _g = lab_lock();
    let o = lab_reads_zero_and_fails("kvm.exit_accounting=0");
    let y = results(&o);
    assert_eq!(y["ok"].as_bool(), Some(false));
    let failed: Vec<_> = y["checks"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|c| c["ok"].as_bool() == Some(false))
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(failed.contains(&"nonzero".to_string()), "{failed:?}");
    assert!(stdout(&o).contains("FAIL"));
}

/// The leaves are a per-VM opt-in: with `kvm.exit_stats_leaves=0` on L1 (after the lab's own
/// `=1`), L2's QEMU does not enable them, L2 (an AMD-vendor guest) reads KVM's out-of-range
/// answer, all zero, and the lab says why.
#[test]
fn leaves_not_enabled_make_the_lab_fail_loudly() {
    let _g = lab_lock();
    let o = lab_reads_zero_and_fails("kvm.exit_stats_leaves=0");
    let out = stdout(&o);
    assert!(out.contains("check nonzero              FAIL"), "{out}");
    assert!(out.contains("kvm.exit_stats_leaves=1"), "{out}");
}

/// A foreign static program: prints its argument, a shipped data file's mode and
/// content, and its own reading of the leaf; exits 7.
const FOREIGN_PROGRAM: &str = r#"
#include <stdio.h>
#include <sys/stat.h>
#include <cpuid.h>
int main(int argc, char **argv) {
    struct stat st;
    char buf[64] = {0};
    FILE *f = fopen("data.txt", "r");
    unsigned a, b, c, d;
    if (argc < 2 || !f || stat("data.txt", &st) || !fgets(buf, sizeof buf, f))
        return 99;
    printf("arg=%s\n", argv[1]);
    printf("data.txt mode=%o content=%s", st.st_mode & 0777, buf);
    __cpuid_count(0x4FFFFFFF, 0, a, b, c, d);
    printf("CPUID(0x4FFFFFFF), exits=%u, cycles spent in exit=%llu\n", a,
           ((unsigned long long)b << 32) | c);
    fprintf(stderr, "to stderr\n");
    return 7;
}
"#;

/// `gcc -static -O2 -o prog src`: a program of the user's for `labctl exec`.
fn compile_static(src: &Path, prog: &Path) {
    let cc = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(prog)
        .arg(src)
        .status()
        .expect("this test needs gcc with static glibc: apt-get install -y gcc libc6-dev");
    assert!(cc.success(), "gcc -static failed");
}

#[test]
fn exec_runs_a_foreign_static_binary_and_returns_its_status() {
    let dir = std::env::temp_dir().join(format!("labctl-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("prog.c");
    let prog = dir.join("prog");
    std::fs::write(&src, FOREIGN_PROGRAM).unwrap();
    compile_static(&src, &prog);
    let data = dir.join("data.txt");
    std::fs::write(&data, "hello\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o640)).unwrap();

    let _g = lab_lock();
    let o = boot(&[
        "exec",
        "--file",
        prog.to_str().unwrap(),
        "--file",
        data.to_str().unwrap(),
        "--",
        "./prog",
        "first argument",
    ]);
    assert_eq!(code(&o), 7, "the guest program's exit status comes back");
    let out = stdout(&o);
    assert!(out.contains("arg=first argument\n"), "{out}");
    assert!(out.contains("data.txt mode=640 content=hello\n"), "{out}");
    assert!(stderr(&o).contains("to stderr"));
    let r = readings(&o);
    assert_eq!(r.len(), 1);
    assert!(r[0].exits > 0 && r[0].cycles > 0, "{r:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// 40 000 lines (1.9 MB) from a program in L2 reach the host, every one and in order.
/// L2's output travels on a virtio serial port, which QEMU throttles when L1 is behind;
/// on a virtio console QEMU dropped what it could not write at once (15 382 of these
/// lines arrived, and exit 0).
#[test]
fn exec_delivers_a_large_output_whole() {
    let dir = std::env::temp_dir().join(format!("labctl-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, prog) = (dir.join("big.c"), dir.join("big"));
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void) { for (int i = 0; i < 40000; i++) printf(\"line %06d abcdefghijklmnopqrstuvwxyz0123456789\\n\", i); return 0; }\n",
    )
    .unwrap();
    compile_static(&src, &prog);
    let _g = lab_lock();
    let o = boot(&["exec", "--file", prog.to_str().unwrap(), "--", "./big"]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(lines.len(), 40000, "lines lost on the way");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            *l,
            format!("line {i:06} abcdefghijklmnopqrstuvwxyz0123456789")
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exec_reports_a_command_that_cannot_start() {
    let _g = lab_lock();
    let o = boot(&["exec", "--", "/no/such/program"]);
    assert_eq!(code(&o), 127);
    assert!(stderr(&o).contains("could not run"), "{}", stderr(&o));
}

#[test]
fn selftest_passes_inside_l1() {
    let _g = lab_lock();
    let o = boot(&["selftest"]);
    assert_eq!(code(&o), 0, "the KVM selftest failed in L1");
    let out = stdout(&o);
    assert!(out.contains("1..10"), "{out}");
    let oks = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(oks, 10, "{out}");
    assert!(!out.contains("not ok") && !out.contains("# SKIP"), "{out}");
    for case in [
        "readings, 1 vCPU(s)",
        "readings, 4 vCPU(s)",
        "per-reason leaves",
        "emulated CPUID",
        "accounting off",
        "VMM's entry",
        "not enabled",
        "kvm.exit_stats_leaves=Y",
        "created while reading",
    ] {
        assert!(out.contains(case), "case {case:?} missing:\n{out}");
    }
}

/// The series' port to Linux 6.1, Debian 12's own kernel (kernel/6.1): built from
/// linux-source-6.1 into its own cache, it passes what the 6.12 series passes.
#[test]
fn the_6_1_port_passes_lab_stress_and_selftest() {
    let _g = lab_lock();
    let o = boot(&["lab", "--kernel-series", "6.1"]);
    assert_eq!(code(&o), 0, "labctl lab --kernel-series 6.1 failed");
    growing_readings(&o);
    let y = results(&o);
    assert!(y["checks"]
        .as_sequence()
        .unwrap()
        .iter()
        .all(|c| c["ok"].as_bool() == Some(true)));
    assert!(y["kernel"]["version"].as_str().unwrap().starts_with("6.1."));
    assert!(y["kernel"]["source"]
        .as_str()
        .unwrap()
        .contains("linux-source-6.1"));
    assert_eq!(
        y["kernel"]["patches"].as_sequence().unwrap().len(),
        series_patch_count("6.1")
    );
    assert!(y["l1"]["kernel"].as_str().unwrap().starts_with("6.1."));
    assert!(y["l2"]["kernel"].as_str().unwrap().starts_with("6.1."));
    // Its own build cache: building 6.1 left 6.12's alone.
    assert!(repo().join("build/kernel-6.1/build-info.yaml").is_file());

    let k = "5000";
    let o = boot(&[
        "stress",
        "--kernel-series",
        "6.1",
        "--vcpus",
        "4",
        "--iterations",
        k,
    ]);
    assert_eq!(code(&o), 0, "stress --kernel-series 6.1 failed");
    let rows = stress_rows(&stdout(&o));
    assert_eq!(rows.len(), 1, "{}", stdout(&o));
    assert_eq!((rows[0].0, rows[0].4.as_str()), (4, "ok"));
    assert!(rows[0].2 >= 4 * 5000, "{:?}", rows[0]);

    let o = boot(&["selftest", "--kernel-series", "6.1"]);
    assert_eq!(code(&o), 0, "the selftest failed on 6.1");
    let out = stdout(&o);
    assert!(out.contains("1..10"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        10,
        "{out}"
    );
    assert!(!out.contains("not ok") && !out.contains("# SKIP"), "{out}");
}

#[test]
fn a_hung_boot_times_out_and_names_the_logs() {
    let _g = lab_lock();
    // Make sure everything is built, so the 1 s budget is spent booting.
    assert_eq!(code(&labctl(&["build"])), 0);
    let o = labctl(&["lab", "--timeout", "1"]);
    assert_eq!(code(&o), 124);
    let err = stderr(&o);
    assert!(err.contains("timed out after 1 s"), "{err}");
    assert!(
        err.contains("l1-console.log") && err.contains("l2-console.log"),
        "{err}"
    );
    // Where L1 was when it was stopped: every vCPU's registers, from QEMU's monitor.
    let path = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("L1 CPUs"))
        .map(|p| p.trim().to_string())
        .unwrap_or_else(|| panic!("no L1 CPUs file named: {err}"));
    let regs = std::fs::read_to_string(&path).unwrap();
    assert!(regs.contains("RIP=") && regs.contains("CR3="), "{regs}");
}

#[test]
fn a_guest_kernel_panic_is_reported_with_its_log() {
    let _g = lab_lock();
    // No init in the image under that name, and no root disk: L1's kernel panics at boot.
    let o = labctl(&["lab", "--l1-cmdline", "rdinit=/no-such-init"]);
    assert_eq!(code(&o), 125);
    let err = stderr(&o);
    assert!(err.contains("L1 kernel panicked"), "{err}");
    // Without a block layer the kernel finds no init; with it (the lab has virtio-blk
    // for record-boot's disk) it first looks for a root file system and finds none.
    assert!(
        err.contains("No working init found") || err.contains("Unable to mount root fs"),
        "{err}"
    );
    assert!(err.contains("l1-console.log"), "{err}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = std::env::temp_dir().join(format!("labctl-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let build = tmp.join("build");
    let b = build.to_str().unwrap();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec!["lab".into(), "--vcpus".into(), "0".into()],
            2,
            "the lab supports 1 to 16",
        ),
        (
            vec!["lab".into(), "--vcpus".into(), "17".into()],
            2,
            "out of range",
        ),
        (
            vec![
                "lab".into(),
                "--memory".into(),
                "4G".into(),
                "--l1-memory".into(),
                "2G".into(),
            ],
            2,
            "does not fit",
        ),
        (
            vec!["lab".into(), "--memory".into(), "100G".into()],
            2,
            "out of range",
        ),
        (
            vec!["lab".into(), "--memory".into(), "lots".into()],
            2,
            "not a size",
        ),
        (
            vec!["lab".into(), "--timeout".into(), "0".into()],
            2,
            "timeout",
        ),
        (
            vec![
                "build".into(),
                "--build-dir".into(),
                b.into(),
                "--kernel-src".into(),
                "/no/such/tree".into(),
            ],
            2,
            "kernel source /no/such/tree",
        ),
        (
            vec![
                "exec".into(),
                "--file".into(),
                "/no/such/file".into(),
                "--".into(),
                "true".into(),
            ],
            2,
            "--file /no/such/file",
        ),
        (vec!["exec".into()], 2, "CMD"),
    ];
    for (args, want_code, want_msg) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = labctl(&args);
        assert_eq!(code(&o), want_code, "{args:?}");
        assert!(stderr(&o).contains(want_msg), "{args:?}: {}", stderr(&o));
    }

    // A tree that is not 6.12 is refused, and the build directory is left alone.
    let old = tmp.join("linux-6.6");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("Makefile"),
        "VERSION = 6\nPATCHLEVEL = 6\nSUBLEVEL = 1\n",
    )
    .unwrap();
    let o = labctl(&[
        "build",
        "--build-dir",
        b,
        "--kernel-src",
        old.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("Linux 6.6.1, but --kernel-series is 6.12"),
        "{}",
        stderr(&o)
    );
    // A 6.12 tree given for the 6.1 port is refused, and the message names the way out.
    let new = tmp.join("linux-6.12");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(
        new.join("Makefile"),
        "VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\n",
    )
    .unwrap();
    let o = labctl(&[
        "build",
        "--build-dir",
        b,
        "--kernel-series",
        "6.1",
        "--kernel-src",
        new.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("or --kernel-series 6.12 to build that version's port"),
        "{}",
        stderr(&o)
    );
    // A series labctl has no port for is refused by the command line itself.
    let o = labctl(&["build", "--build-dir", b, "--kernel-series", "5.10"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("6.12, 6.1"), "{}", stderr(&o));

    // Unknown keys in lab.yaml name their line and column.
    let yaml = tmp.join("lab.yaml");
    std::fs::write(&yaml, "accel: tcg\nl2:\n  cpus: 2\n").unwrap();
    let o = labctl(&["--config", yaml.to_str().unwrap(), "lab"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("unknown field `cpus`"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("line 3 column 3"), "{}", stderr(&o));

    // --accel kvm where hardware KVM cannot nest fails and says why.
    if !host_can_nest_with_kvm() {
        let o = labctl(&["lab", "--accel", "kvm"]);
        assert_eq!(code(&o), 2);
        assert!(
            stderr(&o).contains("--accel kvm is not possible here"),
            "{}",
            stderr(&o)
        );
    }
    std::fs::remove_dir_all(tmp).unwrap();
}

/// The patches the lab's kernel is built from: the series, then the lab's workarounds.
fn kernel_patch_count() -> usize {
    series_patch_count("6.12")
}

/// The patches labctl applies for a kernel series: `kernel/<series>/{patches,lab-patches}`.
fn series_patch_count(series: &str) -> usize {
    ["patches", "lab-patches"]
        .iter()
        .map(|d| {
            std::fs::read_dir(repo().join("kernel").join(series).join(d))
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "patch"))
                .count()
        })
        .sum()
}

#[test]
fn kernel_series_passes_checkpatch_strict_and_w1() {
    for series in ["6.12", "6.1"] {
        kernel_check(series);
    }
}

fn kernel_check(series: &str) {
    let _g = lab_lock();
    let o = labctl(&["kernel-check", "--kernel-series", series]);
    assert_eq!(code(&o), 0, "kernel quality gate failed on {series}");
    let out = stdout(&o);
    let patches = series_patch_count(series);
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ok   checkpatch --strict "))
            .count(),
        patches,
        "{out}"
    );
    assert!(out.contains("ok   make W=1 arch/x86/kvm/"), "{out}");
}

/// Kills the QEMU whose command line mentions `needle` (the run directory).
fn kill_qemu_mentioning(needle: &str) -> bool {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu-system") && cmdline.contains(needle) {
            // SAFETY: plain kill(2) of a process this test started indirectly.
            return unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
        }
    }
    false
}

#[test]
fn a_killed_qemu_is_reported_as_a_crash_with_its_logs() {
    use std::io::{BufRead, BufReader};
    let _g = lab_lock();
    assert_eq!(code(&labctl(&["build"])), 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(["lab"])
        .current_dir(repo())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut run_dir = None;
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if let Some((_, path)) = line.split_once("console: ") {
            run_dir = Path::new(path.trim()).parent().map(Path::to_path_buf);
        }
        if line.contains("L1 up") {
            break;
        }
        line.clear();
    }
    let run_dir = run_dir.unwrap_or_else(|| panic!("no run directory announced:\n{seen}"));
    assert!(
        kill_qemu_mentioning(run_dir.to_str().unwrap()),
        "QEMU not found"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(126), "{seen}{rest}");
    assert!(rest.contains("QEMU exited"), "{rest}");
    assert!(rest.contains("signal: 9"), "{rest}");
    assert!(rest.contains("l1-console.log"), "{rest}");
}

/// One row of the stress table: vCPUs, threads, exits, excess, checks.
fn stress_rows(out: &str) -> Vec<(u32, u32, u64, i64, String)> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with("vCPUs threads"));
    lines.next();
    lines
        .take_while(|l| !l.starts_with("sweep:"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[6].parse().unwrap(),
                f[7].to_string(),
            )
        })
        .collect()
}

#[test]
fn stress_at_1_and_4_vcpus_is_exact() {
    let _g = lab_lock();
    let k: u64 = 5000;
    let o = boot(&["stress", "--vcpus", "1,4", "--iterations", &k.to_string()]);
    assert_eq!(code(&o), 0, "stress checks failed");
    let out = stdout(&o);
    let rows = stress_rows(&out);
    assert_eq!(rows.len(), 2, "{out}");
    for (vcpus, threads, exits, excess, checks) in rows {
        assert_eq!(threads, vcpus);
        assert!(exits >= u64::from(threads) * k, "{exits} exits");
        assert_eq!(excess, exits as i64 - (u64::from(threads) * k) as i64);
        assert!(excess < (u64::from(threads) * k) as i64);
        assert_eq!(checks, "ok");
    }
    for name in [
        "pinned",
        "exits-per-cpuid",
        "cpuid-reason",
        "cycles-grow",
        "matches-kvm-stats",
        "per-vcpu-reason-sums",
        "every-vcpu-did-its-share",
    ] {
        assert_eq!(
            out.lines()
                .filter(|l| l.starts_with(&format!("check {name} ")) && l.contains(" ok "))
                .count(),
            2,
            "{name}: {out}"
        );
    }
    // Every one of the 4 vCPUs took at least its thread's CPUIDs, by KVM's own count.
    let share = out
        .lines()
        .rfind(|l| l.starts_with("check every-vcpu-did-its-share"))
        .unwrap();
    let per: Vec<u64> = share
        .split("exits per vCPU: ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|p| p.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(per.len(), 4, "{share}");
    assert!(per.iter().all(|&e| e >= k), "{share}");
    // The first boot's results (1 vCPU) hold its own readings and figures under `stress:`.
    let y = results(&o);
    assert_eq!(y["stress"]["figures"]["cpuids"].as_u64(), Some(k));
    assert_eq!(y["stress"]["readings"].as_sequence().map(Vec::len), Some(2));
}

#[test]
fn stress_fails_loudly_with_accounting_off() {
    let _g = lab_lock();
    let o = boot(&[
        "stress",
        "--vcpus",
        "2",
        "--iterations",
        "2000",
        "--l1-cmdline",
        "kvm.exit_accounting=0",
    ]);
    assert_eq!(code(&o), 1);
    let out = stdout(&o);
    assert!(out.contains("check exits-per-cpuid      FAIL"), "{out}");
    assert!(out.contains("check cpuid-reason"), "{out}");
    assert!(out.contains("check matches-kvm-stats    FAIL"), "{out}");
}

#[test]
fn stress_allows_more_threads_than_vcpus_and_says_so() {
    let _g = lab_lock();
    let o = boot(&[
        "stress",
        "--vcpus",
        "1",
        "--threads",
        "3",
        "--iterations",
        "1000",
    ]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(
        out.contains("note:     3 threads on 1 vCPUs: threads share vCPUs"),
        "{out}"
    );
    let rows = stress_rows(&out);
    assert_eq!(rows[0].1, 3);
    assert!(rows[0].2 >= 3000);
}

#[test]
fn stress_rejects_bad_input() {
    for (args, msg) in [
        (vec!["stress", "--vcpus", "0"], "the lab supports 1 to 16"),
        (
            vec!["stress", "--vcpus", "1,2,99"],
            "the lab supports 1 to 16",
        ),
        (vec!["stress", "--vcpus", "two"], "give vCPU counts like"),
        (vec!["stress", "--iterations", "0"], "--iterations 0"),
        (
            vec!["stress", "--threads", "0"],
            "--threads must be at least 1",
        ),
        (
            vec!["stress", "--leaf", "0x1FFFFFFFF"],
            "does not fit in 32 bits",
        ),
        (vec!["stress", "--leaf", "cpuid"], "is not a number"),
        (
            vec!["stress", "--iterations", "1000000000"],
            "more than the",
        ),
    ] {
        let o = labctl(&args);
        assert_eq!(code(&o), 2, "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn exit_cost_is_deterministic_and_accounting_is_cheap() {
    let _g = lab_lock();
    // Five repeats, not three: L1's own housekeeping (timers, the lab's relay) lands in
    // some measurement windows, at virtual times that depend on the machine (seen on CI:
    // two of three "on" repeats disturbed). Interference only adds, so the check is on
    // the two lowest repeats, and with five, two undisturbed ones are there to compare.
    let o = boot(&[
        "bench",
        "exit-cost",
        "--no-baseline",
        "--wide-vcpus",
        "0",
        "--repeats",
        "5",
    ]);
    // The bench checks the goals. "on" costs 15-16 instructions per exit over "off", right
    // at its 0.5 % goal (16.2 of ~3247): which side of it a run lands on depends on which
    // repeat is the least disturbed (README, Performance). So that check alone may fail;
    // every other check must pass, and the cost is bounded below.
    assert!(
        matches!(code(&o), 0 | 1),
        "exit-cost failed to run: {}",
        stderr(&o)
    );
    let y = results(&o);
    assert_eq!(
        y["schema"].as_str(),
        Some("kvm-exit-lab/bench-exit-cost/v1")
    );
    for c in y["checks"].as_sequence().unwrap() {
        if c["name"].as_str() != Some("on-vs-off") {
            assert_eq!(c["ok"].as_bool(), Some(true), "{c:?}");
        }
    }
    let variants = y["variants"].as_sequence().unwrap();
    let lowest = |name: &str| {
        variants
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap()["min"]
            .as_f64()
            .unwrap()
    };
    let (on, off, query) = (lowest("on"), lowest("off"), lowest("query"));
    // Hundreds to thousands of L1 instructions per round trip, not noise around zero.
    assert!(off > 500.0, "{off}");
    // Accounting adds instructions: at most 20 per exit (0.62 %), i.e. no per-exit walk,
    // lock or call beyond what the README itemizes.
    assert!(on >= off && on <= off + 20.0, "on {on}, off {off}");
    // The queries are answered by KVM: they cost more than a plain leaf, and the
    // per-reason ones, which walk the exit-reason slots, more than the total.
    assert!(query > on, "query {query}, on {on}");
    let (sdm, native) = (lowest("query-sdm"), lowest("query-native"));
    assert!(
        sdm > query && native > query,
        "sdm {sdm}, native {native}, query {query}"
    );
    for v in variants {
        assert!(v["agreement_pct"].as_f64().unwrap() <= 0.2, "{v:?}");
    }
}

#[test]
fn scaling_flips_accounting_before_anything_else_wakes_l2s_qemu() {
    let _g = lab_lock();
    // The bench's first L2 step asks L1 to set a parameter: L1's answer is the first byte
    // L2's QEMU must read from the protocol socket, before any checkpoint had L1 talk to
    // that QEMU over QMP. QEMU 7.2 did not read it until its main loop woke for another
    // reason, and the bench hung every time (docs/measurements.md, "Reliability").
    let o = boot(&[
        "bench",
        "scaling",
        "--vcpus",
        "1,2",
        "--iterations",
        "2000",
        "--repeats",
        "2",
    ]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let y = results(&o);
    assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/bench-scaling/v1"));
    let rows = y["rows"].as_sequence().unwrap();
    let seen: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["vcpus"].as_u64().unwrap(),
                r["accounting"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(1, "on"), (1, "off"), (2, "on"), (2, "off")]);
    for r in rows {
        let rates = r["exits_per_s"].as_sequence().unwrap();
        assert_eq!(rates.len(), 2, "{r:?}");
        // A CPUID exit takes tens of microseconds here: thousands per second per vCPU,
        // not zero and not the millions of a CPUID that did not exit.
        for x in rates {
            let x = x.as_f64().unwrap();
            assert!((1000.0..1_000_000.0).contains(&x), "{r:?}");
        }
    }
    assert_eq!(y["runs"].as_sequence().unwrap().len(), 2);
}

#[test]
fn turnaround_splits_each_lab_run_into_its_steps() {
    let _g = lab_lock();
    let o = boot(&["bench", "turnaround", "--runs", "2", "--stress-runs", "1"]);
    // The goals are this machine's (2 cores): a slower one may miss them (1), but the
    // bench must run (not 2 or a crash) and report every figure.
    assert!(
        matches!(code(&o), 0 | 1),
        "turnaround failed to run: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    let path = out
        .lines()
        .find_map(|l| l.strip_prefix("figures: "))
        .expect("turnaround printed no figures path");
    let y = yaml_file(Path::new(path.trim()));
    assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/turnaround/v1"));
    let runs = y["lab_runs"].as_sequence().unwrap();
    assert_eq!(runs.len(), 2);
    let mut walls = Vec::new();
    for r in runs {
        assert_eq!(r["ok"].as_bool(), Some(true), "{r:?}");
        let wall = r["wall_s"].as_f64().unwrap();
        let steps: Vec<f64> = r["steps"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().expect("every step reached"))
            .collect();
        assert_eq!(steps.len(), 7, "{r:?}");
        // The instants come in order (no step negative) and account for the whole run.
        assert!(steps.iter().all(|&s| s >= 0.0), "{steps:?}");
        assert!(
            (steps.iter().sum::<f64>() - wall).abs() < 1e-6,
            "{steps:?} vs {wall}"
        );
        // Two boots happened: L1's and L2's each take well over a tenth of a second.
        assert!(steps[2] > 0.1 && steps[3] > 0.1, "{steps:?}");
        walls.push(wall);
    }
    // Touching x86.c made the next lab run recompile and relink the kernel first.
    let touch = y["touch_and_lab_s"].as_f64().expect("touch and lab timed");
    let slowest = walls.iter().copied().fold(0.0, f64::max);
    assert!(
        touch > slowest + 1.0,
        "touch+lab {touch} s, lab runs {walls:?}"
    );
    assert_eq!(y["stress_s"].as_sequence().unwrap().len(), 1);
    for c in y["checks"].as_sequence().unwrap() {
        let name = c["name"].as_str().unwrap();
        if ["lab-runs", "touch-and-lab-ran", "stress-runs"].contains(&name) {
            assert_eq!(c["ok"].as_bool(), Some(true), "{c:?}");
        }
    }
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("labctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn yaml_file(p: &Path) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml_ng::from_str(&text).expect("YAML")
}

#[test]
fn record_boot_of_the_minimal_guest_is_a_checked_series() {
    let _g = lab_lock();
    let out = tmp_dir("record");
    let o = boot(&[
        "record-boot",
        "--guest",
        "minimal",
        "--interval",
        "20",
        "--idle",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "record-boot's checks failed");
    let y = yaml_file(&out.join("summary.yaml"));
    assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/record-boot/v1"));
    assert_eq!(y["complete"].as_bool(), Some(true));
    let phases: Vec<&str> = y["phases"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["firmware", "kernel", "userspace", "idle", "shutdown"]
    );

    // The series, read back from the CSV and checked here independently of labctl.
    let csv = std::fs::read_to_string(out.join("samples.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (t, phase, tag, exits) = (col("t_s"), col("phase"), col("tag"), col("exits"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.len() > 50, "only {} samples", rows.len());
    let mut order = Vec::new();
    for w in rows.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(a[t].parse::<f64>().unwrap() <= b[t].parse::<f64>().unwrap());
        assert!(
            a[exits].parse::<u64>().unwrap() <= b[exits].parse::<u64>().unwrap(),
            "exits went backwards: {a:?} -> {b:?}"
        );
    }
    for r in &rows {
        if order.last() != Some(&r[phase]) {
            order.push(r[phase]);
        }
    }
    assert_eq!(
        order,
        ["firmware", "kernel", "userspace", "idle", "shutdown"]
    );
    // The idle phase lasted the second asked for, within 10 %: L2's timers fire on time
    // (they did not before kernel/6.12/patches/0001).
    let idle = &y["phases"][3];
    let secs = idle["end_s"].as_f64().unwrap() - idle["start_s"].as_f64().unwrap();
    assert!(
        (1.0..=1.1).contains(&secs),
        "idle phase {secs} s for the 1 s asked"
    );
    // The guest's own reading sits between the two checkpoints around it.
    let at = |name: &str| -> u64 {
        rows.iter().find(|r| r[tag] == name).unwrap()[exits]
            .parse()
            .unwrap()
    };
    let guest = y["guest_reading"]["exits"].as_u64().unwrap();
    assert!(at("boot-done-before") < guest && guest <= at("boot-done"));
    // Totals are the last sample; the phases add up to the series.
    let last: u64 = rows.last().unwrap()[exits].parse().unwrap();
    let first: u64 = rows[0][exits].parse().unwrap();
    assert_eq!(y["totals"]["exits"].as_u64(), Some(last));
    let sum: u64 = y["phases"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["exits"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, last - first);

    // By reason: at every sample the reasons' exits add up to the exit count (at least
    // it, at most the next sample's plus the one vCPU's exit in flight), recomputed here
    // from the CSV's <reason>_exits columns.
    let reason_cols: Vec<usize> = header
        .iter()
        .enumerate()
        // KVM's per-kind counters are the other `*_exits` columns.
        .filter(|(_, h)| h.ends_with("_exits") && !SAMPLED_STATS.contains(h))
        .map(|(i, _)| i)
        .collect();
    for name in [
        "cpuid_exits",
        "io_instruction_exits",
        "ept_violation_exits",
        "hlt_exits",
        "external_interrupt_exits",
        "msr_write_exits",
    ] {
        assert!(header.contains(&name), "no {name} column: {header:?}");
    }
    let n = |r: &Vec<&str>, i: usize| r[i].parse::<u64>().unwrap();
    for (i, r) in rows.iter().enumerate() {
        let by_reason: u64 = reason_cols.iter().map(|c| n(r, *c)).sum();
        let e = n(r, exits);
        assert!(
            by_reason >= e,
            "sample {i}: {by_reason} by reason < {e} exits"
        );
        if let Some(next) = rows.get(i + 1) {
            assert!(
                by_reason <= n(next, exits) + 1,
                "sample {i}: {by_reason} by reason"
            );
        }
    }
    // Each phase's reasons add up to the phase's exits, give the shares, and the busiest
    // phases are what the README says: nested page faults first in the firmware (the
    // loader writing the kernel into fresh memory), port I/O (the console) in the kernel.
    // A phase is the difference of two samples, each of which may have the one vCPU's
    // exit in flight (counted by reason, not yet in `exits`): so the two sums are equal
    // to within one, either way.
    for p in y["phases"].as_sequence().unwrap() {
        let rs = p["reasons"].as_sequence().unwrap();
        let sum: u64 = rs.iter().map(|r| r["exits"].as_u64().unwrap()).sum();
        let e = p["exits"].as_u64().unwrap();
        assert!(
            sum.abs_diff(e) <= 1,
            "{}: {sum} by reason, {e} exits",
            p["name"].as_str().unwrap()
        );
        let pct: f64 = rs.iter().map(|r| r["exits_pct"].as_f64().unwrap()).sum();
        assert!((pct - 100.0).abs() < 0.01, "{pct}");
    }
    let top = |phase: usize| {
        y["phases"][phase]["reasons"][0]["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(top(0), "EPT_VIOLATION");
    assert_eq!(top(1), "IO_INSTRUCTION");
    assert!(
        stdout(&o).contains("check per-reason-sum       ok"),
        "{}",
        stdout(&o)
    );
    let bytes = y["sample_bytes"]["mean"].as_f64().unwrap();
    assert!(bytes > 60.0 && bytes < 400.0, "{bytes} bytes per sample");

    // The plot: an SVG with the phases named, the rate stacked by reason with a legend,
    // and its PNG.
    let svg = std::fs::read_to_string(out.join("exits.svg")).unwrap();
    for p in phases {
        assert!(svg.contains(p), "{p} missing from the plot");
    }
    // Every text element's content, trimmed (plotters writes it on a line of its own).
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>')?.1.split_once("</text>"))
        .map(|(content, _)| content.trim())
        .collect();
    for legend in ["IO_INSTRUCTION", "EPT_VIOLATION", "other"] {
        assert!(
            texts.contains(&legend),
            "{legend} not in the legend: {texts:?}"
        );
    }
    let png = std::fs::read(out.join("exits.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
}

#[test]
fn record_boot_keeps_a_partial_series_when_the_boot_does_not_finish() {
    let _g = lab_lock();
    assert_eq!(code(&labctl(&["build"])), 0);
    let out = tmp_dir("record-partial");
    // L1 is up after ~2 s and L2's VM exists soon after; 7 s is not enough for its boot.
    let o = labctl(&[
        "record-boot",
        "--timeout",
        "7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 124);
    let err = stderr(&o);
    assert!(err.contains("partial series"), "{err}");
    let y = yaml_file(&out.join("summary.yaml"));
    assert_eq!(y["complete"].as_bool(), Some(false));
    assert!(y["error"].as_str().unwrap().contains("timed out"));
    assert!(y["samples"].as_u64().unwrap() > 0, "no samples kept");
    assert!(out.join("samples.csv").is_file() && out.join("exits.svg").is_file());
}

#[test]
fn record_boot_rejects_bad_input() {
    let unwritable = "/proc/labctl-no-such-dir";
    for (args, msg) in [
        (
            vec!["record-boot", "--guest", "windows"],
            "invalid value 'windows'",
        ),
        (
            vec!["record-boot", "--interval", "0"],
            "sampling interval from 1",
        ),
        (
            vec!["record-boot", "--interval", "soon"],
            "invalid value 'soon'",
        ),
        (
            vec!["record-boot", "--out", unwritable],
            "pass --out with a writable",
        ),
    ] {
        let o = labctl(&args);
        assert_eq!(code(&o), 2, "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
    // The plot's font is checked before anything boots, and the error says what to do.
    let o = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(["record-boot", "--idle", "1"])
        .current_dir(repo())
        .env("LABCTL_FONT_DIR", "/nonexistent-fonts")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    let e = stderr(&o);
    assert!(
        e.contains("/nonexistent-fonts/DejaVuSans.ttf") && e.contains("install fonts-dejavu-core"),
        "{e}"
    );
    assert!(!e.contains("[boot]"), "nothing booted: {e}");
}

/// KVM's own selftests, built from the patched tree and run in L1: the binary stats
/// test reads every descriptor, the two sized per-reason ones included; CPUID's.
#[test]
fn kvm_own_selftests_pass_on_the_patched_kernel() {
    let _g = lab_lock();
    let o = boot(&[
        "kvm-selftests",
        "--tests",
        "kvm_binary_stats_test,x86_64/cpuid_test",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let y = results(&o);
    assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/kvm-selftests/v1"));
    let tests = y["tests"].as_sequence().unwrap();
    assert_eq!(tests.len(), 2);
    for t in tests {
        assert_eq!(t["patched"].as_str(), Some("pass"), "{t:?}");
    }
    // Bad input is refused before anything is booted.
    for bad in ["../../etc/passwd", "x86_64/no_such_test"] {
        let o = labctl(&["kvm-selftests", "--tests", bad]);
        assert_eq!(code(&o), 2, "{bad}");
        assert!(stderr(&o).contains("--tests"), "{bad}: {}", stderr(&o));
    }
    let o = labctl(&["kvm-selftests", "--baseline", "/no/such/bzImage"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--baseline"), "{}", stderr(&o));
}

/// The outer QEMU's major version (`qemu-system-x86_64 --version`).
fn qemu_major() -> u32 {
    let o = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 runs");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no version in {text:?}"))
}

/// QEMU 7.2's emulated VMRUN drops the guest's interrupt shadow, so an interrupt held
/// back for the shadow of an STI was delivered before the HLT it was to wake (lost
/// wake-ups). The lab's KVM completes a HLT in the shadow itself instead
/// (kernel/6.12/lab-patches/0001); its selftest (lab-patches/0002) counts interrupts taken
/// inside the shadow and HLTs the pending interrupt did not wake, and must find none.
/// With the workaround turned off, QEMU before 8.0 shows the bug (7-12 in 20 000 every
/// time it was measured); a newer QEMU, or hardware SVM, must pass either way.
#[test]
fn an_interrupt_pending_across_sti_hlt_wakes_the_hlt() {
    let _g = lab_lock();
    let test = "x86_64/sti_hlt_wakeup_test";
    let o = boot(&["kvm-selftests", "--tests", test]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("20000 IPIs, 0 inside the STI shadow;") && out.contains(", 0 before the IPI"),
        "{out}"
    );

    let o = boot(&[
        "kvm-selftests",
        "--tests",
        test,
        "--l1-cmdline",
        "kvm_amd.shadow_hlt=0",
    ]);
    let out = stdout(&o);
    if !host_can_nest_with_kvm() && qemu_major() < 8 {
        assert_eq!(
            code(&o),
            1,
            "the bug did not show without the workaround:\n{out}"
        );
        let early: u32 = out
            .split_once(" IPIs, ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of IPIs inside the shadow:\n{out}"));
        assert!(early > 0, "{out}");
    } else {
        assert_eq!(code(&o), 0, "{out}");
    }
}

/// `test_assignment3 --native` walks the vendor's own codes (SVM here: 0x0..=0xA2 and
/// 0x400..=0x403); bad reasons get exit 2 and say what to give; with the leaves not
/// enabled for the VM it says so and exits 1 instead of printing zeros.
#[test]
fn test_assignment3_walks_native_codes_and_refuses_bad_input() {
    let _g = lab_lock();
    let o = boot(&["exec", "--", "/guest/test_assignment3", "--native"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines: Vec<ReasonLine> = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("CPUID(0x4FFFFFFD)"))
        .map(|l| l.parse().unwrap())
        .collect();
    if !host_can_nest_with_kvm() {
        assert_eq!(
            lines.len(),
            0xA3 + 4,
            "SVM's codes under TCG's emulated AMD"
        );
        let npf = lines.iter().find(|l| l.reason == 0x400).unwrap();
        assert_eq!(npf.name.as_deref(), Some("NPF"));
        assert!(
            matches!(npf.answer, ReasonAnswer::Stats(s) if s.exits > 0),
            "{npf}"
        );
    }
    for (args, wanted) in [
        (vec!["35"], "not defined in the SDM"),
        (vec!["NO_SUCH_REASON"], "give an SDM basic exit reason"),
        (vec!["--native", "0x404"], "unknown native exit code"),
        (vec!["--bogus"], "unknown option"),
    ] {
        let mut argv = vec!["exec", "--", "/guest/test_assignment3"];
        argv.extend(args.iter());
        let o = boot(&argv);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(
            stdout(&o).contains(wanted) || stderr(&o).contains(wanted),
            "{args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
    // Leaves not enabled for the VM (kvm.exit_stats_leaves=0 in L1): an error, not zeros.
    let o = boot(&[
        "exec",
        "--l1-cmdline",
        "kvm.exit_stats_leaves=0",
        "--",
        "/guest/test_assignment3",
    ]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let text = stdout(&o) + &stderr(&o);
    assert!(text.contains("exit_stats_leaves=1"), "{text}");
    assert!(!text.contains("exit reason 10 (CPUID)"), "{text}");
}

/// The course's paging question: the same L2 boot with nested paging, then shadow paging
/// (`kvm_amd.npt=0`). Under shadow paging KVM intercepts L2's page faults (SDM reason 0)
/// and has no nested page faults (48) to take; the totals and the table say by how much.
#[test]
fn compare_paging_shows_what_shadow_paging_changes() {
    let _g = lab_lock();
    let o = boot(&["compare-paging"]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("SDM exit reason"), "{out}");
    let y = results(&o);
    assert_eq!(y["schema"].as_str(), Some("kvm-exit-lab/compare-paging/v2"));
    assert_eq!(y["ok"].as_bool(), Some(true));
    let sides = y["sides"].as_sequence().unwrap();
    assert_eq!(sides.len(), 2);
    assert_eq!(sides[0]["mode"].as_str(), Some("nested"));
    assert_eq!(sides[1]["mode"].as_str(), Some("shadow"));
    assert!(sides[1]["l1_cmdline"]
        .as_str()
        .unwrap()
        .contains("kvm_amd.npt=0"));
    let exits = |side: &serde_yaml_ng::Value, reason: usize| {
        side["reasons"][reason]["exits"].as_u64().unwrap_or(0)
    };
    let (nested, shadow) = (&sides[0], &sides[1]);
    assert!(exits(shadow, 0) > exits(nested, 0), "{out}");
    assert!(
        exits(nested, 48) > 0 && exits(shadow, 48) < exits(nested, 48),
        "{out}"
    );
    let total = |side: &serde_yaml_ng::Value| side["total_exits"].as_u64().unwrap();
    assert!(total(nested) > 0 && total(shadow) > 0, "{out}");
}

/// The README's host-install recipe on Debian's own kernel in L1 (`labctl host-recipe`):
/// built against it, Debian's KVM swapped out for the patched one (refused first while
/// /dev/kvm is held), the lab's programs checked on it, Debian's KVM restored. Then, on
/// this host, the built modules are refused before anything is unloaded: they are for
/// Debian's kernel, not the running one.
#[test]
fn host_recipe_runs_the_readmes_recipe_on_debians_kernel() {
    let _g = lab_lock();
    let (o, release) = host_recipe_on("debian-6.12");
    assert!(release.ends_with("+deb12-amd64"), "{release}");
    let out = stdout(&o);
    assert!(out.contains("is in use"), "the refusal's message is shown");
    assert!(out.contains("+ insmod "), "the recipe's steps are shown");
    let log = recipe_build_log(&o, &release);
    assert!(log.contains("LOCALVERSION=+deb12-amd64"), "{log}");
    host_recipe_modules_refused_here(&release);
}

/// Debian 12's default kernel, 6.1 (released as 6.1.0-ABI-amd64), with the series' 6.1
/// port: the same recipe and checks.
#[test]
fn host_recipe_runs_on_debians_6_1_kernel() {
    let _g = lab_lock();
    let (o, release) = host_recipe_on("debian-6.1");
    assert!(
        release.starts_with("6.1.0-") && release.ends_with("-amd64"),
        "{release}"
    );
    assert!(
        stdout(&o).contains("is in use"),
        "the refusal's message is shown"
    );
    let log = recipe_build_log(&o, &release);
    assert!(
        log.contains("kernel/6.1/patches/0001-"),
        "the 6.1 port is applied: {log}"
    );
    assert!(log.contains(&format!("KERNELRELEASE={release}")), "{log}");
    host_recipe_modules_refused_here(&release);
}

/// `labctl host-recipe --distro <distro>`: every check passes; returns the run and the
/// release L1 ran.
fn host_recipe_on(distro: &str) -> (Output, String) {
    let o = boot(&["host-recipe", "--distro", distro]);
    assert_eq!(code(&o), 0, "labctl host-recipe --distro {distro} failed");
    let y = results(&o);
    let checks = y["checks"].as_sequence().unwrap();
    let names: Vec<_> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "ran",
        "debian-kernel",
        "distribution-kvm",
        "refuses-while-in-use",
        "recipe-load",
        "recipe-restore",
        "matches-kvm-stats",
        "per-reason-table",
        "per-vcpu-reason-sums",
        "no-stalls",
    ] {
        assert!(names.contains(&want), "no check {want}: {names:?}");
    }
    assert!(checks.iter().all(|c| c["ok"].as_bool() == Some(true)));
    let r = readings(&o);
    assert_eq!(r.len(), 2, "two readings of test_assignment2");
    assert!(r[1].exits > r[0].exits && r[0].exits > 0, "{r:?}");
    // L1 ran Debian's kernel, whose release the recipe built for.
    let l1 = y["l1"]["kernel"].as_str().unwrap();
    let release = l1.split_whitespace().next().unwrap().to_string();
    assert!(l1.contains("Debian"), "{l1}");
    (o, release)
}

/// The recipe build's whole log (every step scripts/host-install printed), at the path
/// labctl named. Its stderr shows only a progress line every 15 s, so what the build ran
/// is read here, not there.
fn recipe_build_log(o: &Output, release: &str) -> String {
    let path = repo()
        .join("build/host-recipe")
        .join(release)
        .join("build.log");
    assert!(
        stderr(o).contains(&path.display().to_string()),
        "labctl names the build's log"
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The modules the recipe built for `release`, on this host: a kernel of another
/// release is running, and the recipe refuses them before unloading anything.
fn host_recipe_modules_refused_here(release: &str) {
    let running = Command::new("uname").arg("-r").output().unwrap();
    let running = String::from_utf8_lossy(&running.stdout).trim().to_string();
    assert_ne!(
        running, release,
        "this host runs Debian's {release} itself: the mismatch cannot be shown here (and `load` would swap this host's KVM)"
    );
    let work = repo().join("build/host-recipe").join(release).join("work");
    let l = Command::new("sh")
        .arg(repo().join("scripts/host-install"))
        .args(["load", "--vendor", "amd", "--dir"])
        .arg(&work)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&l.stderr);
    assert_eq!(l.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!(
            "was built for the kernel {release}, but {running} is running"
        )) && e.contains("Nothing was unloaded"),
        "{e}"
    );
}
