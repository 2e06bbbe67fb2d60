//! Stage 3 of the pipeline, for `record-boot --guest debian`: a real Debian system as an
//! L2 guest. Built from Debian's own packages with debootstrap (pinned suite, minbase plus
//! systemd as init, udev and Debian's kernel), then made into a raw ext4 disk image. It
//! boots Debian's kernel and initramfs (direct kernel boot; the disk has no boot loader)
//! with its root on a virtio disk, reaches multi-user.target, runs `boot-done` (the
//! CPUID reading with the bracketing checkpoints) and powers off.
//!
//! The image is cached in `build/images/debian-<suite>/` and rebuilt only when its recipe
//! (suite, mirror, packages, this module's version, the `boot-done` binary) changes;
//! `image.yaml` records the recipe and `packages.txt` every installed package's version.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use xshell::{cmd, Shell};

use crate::doctor::{self, Need};
use crate::error::setup;
use crate::kernel::sha256_hex;
use crate::progress::{self, Progress};

/// The pinned Debian release.
pub const SUITE: &str = "bookworm";
pub const MIRROR: &str = "http://deb.debian.org/debian";
const VARIANT: &str = "minbase";
/// On top of minbase: systemd as PID 1, udev for /dev, and Debian's kernel (which brings
/// initramfs-tools and its initramfs).
const INCLUDE: &str = "systemd-sysv,udev,linux-image-amd64";
/// Bumped when the image's contents change in ways the other inputs do not show.
const RECIPE: u32 = 3;
/// A fixed machine id: the image never looks like a first boot (no systemd-firstboot
/// prompts on the console) and every boot is the same.
const MACHINE_ID: &str = "6b766d2d657869742d6c61622d646562";
const FS_UUID: &str = "6b766d2d-6578-4974-ad6c-61622d646562";
/// The guest's command line: root on the virtio disk, console on the first serial port
/// (early, so the kernel's first line is timely), every boot message shown (the phase
/// markers are console lines), systemd's status lines on the console.
pub const CMDLINE: &str =
    "root=/dev/vda ro console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 systemd.show_status=1";

const UNIT: &str = "\
[Unit]
Description=kvm-exit-lab: boot done (CPUID 0x4FFFFFFF reading), then power off
After=multi-user.target
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/exitlab-boot-done
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    pub suite: String,
    pub mirror: String,
    pub variant: String,
    pub include: String,
    pub recipe: u32,
    pub boot_done_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebianImage {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub recipe: Recipe,
    /// `linux-image-*` version, from the kernel file name.
    pub kernel_release: String,
}

fn dir(build_dir: &Path) -> PathBuf {
    build_dir.join("images").join(format!("debian-{SUITE}"))
}

/// The cached image, built if missing or out of date. `boot_done` is the static binary.
pub fn image(sh: &Shell, build_dir: &Path, boot_done: &Path) -> Result<DebianImage> {
    let out = dir(build_dir);
    let recipe = Recipe {
        suite: SUITE.into(),
        mirror: MIRROR.into(),
        variant: VARIANT.into(),
        include: INCLUDE.into(),
        recipe: RECIPE,
        boot_done_sha256: sha256_hex(
            &fs::read(boot_done).with_context(|| format!("reading {}", boot_done.display()))?,
        ),
    };
    let stamp = out.join("image.yaml");
    if let Ok(text) = fs::read_to_string(&stamp) {
        if let Ok(img) = serde_yaml_ng::from_str::<DebianImage>(&text) {
            if img.recipe == recipe && img.disk.is_file() && img.kernel.is_file() {
                progress::note("debian", format!("cached image {}", img.disk.display()));
                return Ok(img);
            }
        }
    }
    build(sh, &out, recipe, boot_done)
}

fn build(sh: &Shell, out: &Path, recipe: Recipe, boot_done: &Path) -> Result<DebianImage> {
    doctor::require(&[
        Need::Executable("debootstrap"),
        Need::Executable("mkfs.ext4"),
    ])?;
    if !nix::unistd::geteuid().is_root() {
        return Err(setup(
            "building the Debian guest image needs root (debootstrap chroots and installs packages as root); run `sudo labctl record-boot --guest debian` once, later runs reuse the image",
        ));
    }
    fs::create_dir_all(out)?;
    // The stamp goes first and comes back last: a build cut short is never taken as done.
    let _ = fs::remove_file(out.join("image.yaml"));
    let root = bootstrap(sh, out)?;
    let p = Progress::new("debian");
    configure(&root, boot_done)?;
    let format = "${Package} ${Version}\n";
    let packages = cmd!(sh, "chroot {root} dpkg-query -W -f={format}")
        .quiet()
        .read()
        .context("listing the image's packages")?;
    fs::write(out.join("packages.txt"), format!("{packages}\n"))?;
    let (kernel, initrd, kernel_release) = take_boot_files(&root, out)?;
    let disk = out.join("disk.img");
    make_disk(sh, &root, &disk)?;
    let img = DebianImage {
        disk,
        kernel,
        initrd,
        recipe,
        kernel_release,
    };
    fs::write(out.join("image.yaml"), serde_yaml_ng::to_string(&img)?)?;
    p.done(format!("Debian {SUITE} image {}", img.disk.display()).as_str());
    Ok(img)
}

/// The debootstrapped tree, `out/rootfs`: reused while suite, mirror and packages are the
/// same (`rootfs.yaml`), so changing what `configure` adds does not download again.
fn bootstrap(sh: &Shell, out: &Path) -> Result<PathBuf> {
    let root = out.join("rootfs");
    let stamp = out.join("rootfs.yaml");
    let want =
        format!("suite: {SUITE}\nmirror: {MIRROR}\nvariant: {VARIANT}\ninclude: {INCLUDE}\n");
    if root.join("etc/debian_version").is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == want)
    {
        return Ok(root);
    }
    let _ = fs::remove_file(&stamp);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let log = out.join("build.log");
    let _ = fs::remove_file(&log);
    progress::note(
        "debian",
        format!(
            "debootstrap {VARIANT} {SUITE} from {MIRROR} (a few minutes); log: {}",
            log.display()
        ),
    );
    let command: std::process::Command = cmd!(
        sh,
        "debootstrap --variant={VARIANT} --include={INCLUDE} {SUITE} {root} {MIRROR}"
    )
    .into();
    let status = progress::run_logged(command, &log, "debootstrap")?;
    if !status.success() {
        return Err(setup(format!(
            "debootstrap failed ({status}); can this machine reach {MIRROR}? last lines of {}:\n{}",
            log.display(),
            progress::log_tail(&log, 20)
        )));
    }
    fs::write(&stamp, want)?;
    Ok(root)
}

/// Makes the debootstrapped tree a bootable, self-reporting system.
fn configure(root: &Path, boot_done: &Path) -> Result<()> {
    let w = |rel: &str, text: &str| -> Result<()> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    w("etc/hostname", "exitlab-debian\n")?;
    w(
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 exitlab-debian\n",
    )?;
    // The root file system, checked by nobody (the host boots it with snapshot=on).
    w("etc/fstab", "/dev/vda / ext4 defaults 0 0\n")?;
    w("etc/machine-id", &format!("{MACHINE_ID}\n"))?;
    w("etc/systemd/system/exitlab-boot-done.service", UNIT)?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    let link = wants.join("exitlab-boot-done.service");
    if link.symlink_metadata().is_err() {
        symlink("/etc/systemd/system/exitlab-boot-done.service", &link)?;
    }
    // A unit that hangs while stopping must not hang the lab: 20 s, not 90.
    w(
        "etc/systemd/system.conf.d/exitlab.conf",
        "[Manager]\nDefaultTimeoutStopSec=20s\n",
    )?;
    // Never ask anything on the console.
    let mask = root.join("etc/systemd/system/systemd-firstboot.service");
    if mask.symlink_metadata().is_err() {
        symlink("/dev/null", &mask)?;
    }
    let dest = root.join("usr/local/sbin/exitlab-boot-done");
    fs::create_dir_all(dest.parent().expect("has a parent"))?;
    fs::copy(boot_done, &dest)?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    // Package lists and caches are not part of the system that boots.
    for d in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        let d = root.join(d);
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// Copies Debian's kernel and initramfs out of the tree (L2 boots them directly).
fn take_boot_files(root: &Path, out: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let boot = root.join("boot");
    let mut kernels: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .collect();
    kernels.sort();
    let release = kernels
        .pop()
        .ok_or_else(|| setup(format!("no Debian kernel in {}", boot.display())))?;
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initrd.img");
    fs::copy(boot.join(format!("vmlinuz-{release}")), &kernel)?;
    fs::copy(boot.join(format!("initrd.img-{release}")), &initrd).with_context(|| {
        format!("Debian's initramfs for {release} (did initramfs-tools run in the chroot?)")
    })?;
    Ok((kernel, initrd, release))
}

/// A raw ext4 image of the tree, a quarter larger than its contents.
fn make_disk(sh: &Shell, root: &Path, disk: &Path) -> Result<()> {
    let used = cmd!(sh, "du -sk --apparent-size {root}")
        .quiet()
        .read()
        .context("measuring the tree")?;
    let kib: u64 = used
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("reading du's output")?;
    let size = format!("{}k", (kib + kib / 4 + 65536) / 4 * 4);
    let _ = fs::remove_file(disk);
    cmd!(
        sh,
        "mkfs.ext4 -q -F -L exitlab-root -U {FS_UUID} -E root_owner=0:0 -d {root} {disk} {size}"
    )
    .quiet()
    .ignore_stdout()
    .run()
    .map_err(|e| setup(format!("making the ext4 image failed: {e}")))?;
    Ok(())
}
