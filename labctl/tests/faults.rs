//! Faults a user causes: stopping labctl in the middle of a kernel build or a boot, two
//! labctls on one build directory, a disk that fills up. Each leaves nothing running and
//! nothing half-written that a later run would use; the next run works.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{lab_lock, labctl, repo};

/// Everything built, so that the tests below interrupt only what they mean to.
fn built() {
    let o = labctl(&["build"]);
    assert!(o.status.success(), "labctl build failed");
}

/// labctl started in the background; its stderr lines arrive on the channel. SIGINT is
/// reset to its default action, as in a terminal: a test runner started in the background
/// (`cmd &`) would otherwise hand down "ignore SIGINT".
fn spawn(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_labctl"));
    cmd.args(args)
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: signal() is async-signal-safe; nothing is allocated after fork.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("starting labctl");
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a stderr line containing `needle`; returns it.
fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(_) => panic!("labctl did not print {needle:?} within {within:?}"),
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Processes (other than this test) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Waits until no process mentions `needle` (they may take a moment to die).
fn none_left(needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ctrl_c_during_a_boot_leaves_no_qemu_and_the_next_run_passes() {
    let _g = lab_lock();
    built();
    let (mut child, rx) = spawn(&["lab"]);
    let line = wait_for(&rx, "starting L1", Duration::from_secs(120));
    let console = line.rsplit("console: ").next().unwrap().to_string();
    let run_dir = Path::new(&console).parent().unwrap().display().to_string();
    wait_for(&rx, "L1 up", Duration::from_secs(60));
    assert!(
        !processes_mentioning(&run_dir).is_empty(),
        "QEMU is not running"
    );
    // SIGINT to labctl alone (a terminal would also signal QEMU; this is the harder case).
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert!(!status.success());
    let left = none_left(&run_dir);
    assert!(left.is_empty(), "left running after Ctrl-C: {left:?}");
    let o = labctl(&["lab"]);
    assert_eq!(o.status.code(), Some(0), "the lab after an interrupted one");
}

#[test]
fn an_interrupted_kernel_build_resumes() {
    let _g = lab_lock();
    built();
    // Make the next build recompile KVM's x86.c (what a student's edit does).
    let src = repo().join("build/kernel/src/arch/x86/kvm/x86.c");
    let f = File::options().append(true).open(&src).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    let (mut child, rx) = spawn(&["build"]);
    wait_for(&rx, "[kernel]", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    signal(&child, libc::SIGTERM);
    assert!(!child.wait().unwrap().success());
    let tree = repo().join("build/kernel").display().to_string();
    let left = none_left(&tree);
    assert!(left.is_empty(), "left running after SIGTERM: {left:?}");
    let o = labctl(&["build"]);
    assert!(o.status.success(), "the build after an interrupted one");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Linux 6.12"), "{text}");
}

#[test]
fn two_labctls_on_one_build_directory_take_turns() {
    let _g = lab_lock();
    built();
    // Hold the build directory's lock as another labctl would.
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(repo().join("build/.labctl.lock"))
        .unwrap();
    // SAFETY: flock on a file we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let (mut child, rx) = spawn(&["build"]);
    let line = wait_for(&rx, "waiting for another labctl", Duration::from_secs(30));
    assert!(line.contains("--build-dir"), "{line}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "it did not wait");
    drop(lock);
    let status = child.wait().unwrap();
    assert!(status.success(), "it did not go on once the lock was free");
}

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("labctl-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "mounting a tmpfs needs root: run the tests as root, as CI does"
        );
        Tmpfs(dir)
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_next_run_recovers() {
    let _g = lab_lock();
    built();
    // A build directory on a 24 MiB disk: the L1 image (about 60 MiB) does not fit.
    let disk = Tmpfs::new("24m");
    let build = disk.0.join("build");
    let kernel = repo().join("build/kernel/obj/arch/x86/boot/bzImage");
    let selftest = repo().join("build/kernel/selftests/x86_64/exit_stats_test");
    let guest = repo().join("build/guest");
    let args = [
        "build",
        "--build-dir",
        build.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--selftest",
        selftest.to_str().unwrap(),
        "--guest-dir",
        guest.to_str().unwrap(),
    ];
    let o = labctl(&args);
    assert_eq!(o.status.code(), Some(2), "a full disk is a setup error");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("No space left on device") && err.contains("the disk is full"),
        "{err}"
    );
    let images = build.join("images");
    let leftovers: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "half-written files left in {}: {leftovers:?}",
        images.display()
    );
    // Room made: the same command now works, and the image is complete.
    disk.resize("256m");
    let o = labctl(&args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the build after the disk was freed"
    );
    let image = images.join("l1-base.cpio");
    assert!(
        std::fs::metadata(&image).unwrap().len() > 50 << 20,
        "{} is not a whole image",
        image.display()
    );
    assert!(images.join("l1-base.sha256").is_file());
}
