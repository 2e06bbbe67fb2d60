//! Stage 3 of the pipeline, the images: the static guest programs, and the L1 initramfs
//! (init, QEMU with its libraries and firmware, the kernel for L2, the guest programs, the
//! selftest). A run's job is a small archive appended to the cached base image.

use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use exitlab_proto::cpio::CpioWriter;
use exitlab_proto::job::Job;
use exitlab_proto::vm::{l1, FIRMWARE};
use xshell::{cmd, Shell};

use crate::doctor::{self, Need};
use crate::error::setup;
use crate::kernel::sha256_hex;
use crate::progress::{self, Progress};

/// Guest programs installed in `/guest` of both images.
pub const GUEST_PROGRAMS: &[&str] = &[
    "test_assignment2",
    "test_assignment3",
    "stress",
    "boot-done",
];
pub const INIT_PROGRAM: &str = "lab-init";
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Prebuilt artifacts; anything not given is built by labctl.
#[derive(Debug, Default, Clone)]
pub struct Artifacts {
    pub kernel: Option<PathBuf>,
    pub selftest: Option<PathBuf>,
    pub guest_dir: Option<PathBuf>,
    pub l1_image: Option<PathBuf>,
}

/// Builds the guest programs static, with cargo, into `build/guest`.
pub fn build_guest(sh: &Shell, repo: &Path, build_dir: &Path) -> Result<PathBuf> {
    doctor::require(&[Need::Executable("cargo")])?;
    let manifest = repo.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(setup(format!(
            "cannot build the guest programs: no workspace at {} (pass --repo, or --guest-dir with prebuilt programs)",
            repo.display()
        )));
    }
    let target_dir = build_dir.join("guest-target");
    let _rustflags = sh.push_env("RUSTFLAGS", "-C target-feature=+crt-static");
    let p = Progress::new("guest");
    cmd!(
        sh,
        "cargo build --quiet --release --locked --manifest-path {manifest} -p exitlab-guest --target {GUEST_TARGET} --target-dir {target_dir}"
    )
    .quiet()
    .run()
    .map_err(|e| setup(format!("building the guest programs failed: {e}")))?;
    let bin = target_dir.join(GUEST_TARGET).join("release");
    let out = build_dir.join("guest");
    fs::create_dir_all(&out)?;
    for name in GUEST_PROGRAMS.iter().chain([&INIT_PROGRAM]) {
        copy_if_changed(&bin.join(name), &out.join(name))?;
    }
    p.done("guest programs built (static)");
    Ok(out)
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if fs::read(to).ok().as_ref() != Some(&data) {
        fs::write(to, &data)?;
        fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// One file of an image: where it goes, where it comes from, its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub dest: String,
    pub src: PathBuf,
    pub mode: u32,
}

/// Parses `ldd` output into the libraries' paths (including the dynamic loader).
pub fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        if l.is_empty() || l.starts_with("linux-vdso") || l.starts_with("linux-gate") {
            continue;
        }
        if l.contains("not found") {
            return Err(setup(format!(
                "QEMU needs a library that is not installed: {l}"
            )));
        }
        let path = match l.split_once("=>") {
            Some((_, rhs)) => rhs.trim(),
            None => l,
        };
        let path = path.split(" (").next().unwrap_or(path).trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// QEMU, its libraries and firmware, as files of the L1 image.
pub fn qemu_closure(sh: &Shell) -> Result<Vec<ImageFile>> {
    doctor::require(&[
        Need::Executable("qemu-system-x86_64"),
        Need::Executable("ldd"),
        Need::Firmware("bios-256k.bin"),
        Need::Firmware("linuxboot_dma.bin"),
        Need::Firmware("kvmvapic.bin"),
    ])?;
    let qemu = doctor::which("qemu-system-x86_64").expect("required above");
    let out = cmd!(sh, "ldd {qemu}").quiet().read()?;
    let mut files = vec![ImageFile {
        dest: l1::QEMU.trim_start_matches('/').to_string(),
        src: qemu,
        mode: 0o755,
    }];
    for lib in parse_ldd(&out)? {
        files.push(ImageFile {
            dest: lib
                .display()
                .to_string()
                .trim_start_matches('/')
                .to_string(),
            src: lib,
            mode: 0o755,
        });
    }
    for fw in FIRMWARE {
        files.push(ImageFile {
            dest: format!("{}/{fw}", l1::FIRMWARE_DIR.trim_start_matches('/')),
            src: doctor::find_firmware(fw).expect("required above"),
            mode: 0o644,
        });
    }
    Ok(files)
}

/// Everything in the L1 base image.
pub fn l1_files(
    sh: &Shell,
    kernel: &Path,
    guest_dir: &Path,
    selftest: &Path,
) -> Result<Vec<ImageFile>> {
    let mut files = vec![ImageFile {
        dest: "init".into(),
        src: guest_dir.join(INIT_PROGRAM),
        mode: 0o755,
    }];
    for name in GUEST_PROGRAMS {
        files.push(ImageFile {
            dest: format!("{}/{name}", l1::GUEST_BIN_DIR.trim_start_matches('/')),
            src: guest_dir.join(name),
            mode: 0o755,
        });
    }
    files.push(ImageFile {
        dest: l1::KERNEL.trim_start_matches('/').into(),
        src: kernel.to_path_buf(),
        mode: 0o644,
    });
    files.push(ImageFile {
        dest: l1::SELFTEST.trim_start_matches('/').into(),
        src: selftest.to_path_buf(),
        mode: 0o755,
    });
    files.extend(qemu_closure(sh)?);
    for f in &files {
        if !f.src.is_file() {
            return Err(setup(format!(
                "image input {} is missing (for /{})",
                f.src.display(),
                f.dest
            )));
        }
    }
    Ok(files)
}

/// Fingerprint of an image's inputs: destinations, sources, sizes, modification times.
fn fingerprint(files: &[ImageFile]) -> Result<String> {
    let mut s = String::new();
    for f in files {
        let m = fs::metadata(&f.src)?;
        let mtime = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        s.push_str(&format!(
            "{} {} {:o} {} {mtime}\n",
            f.dest,
            f.src.display(),
            f.mode,
            m.len()
        ));
    }
    Ok(sha256_hex(s.as_bytes()))
}

/// Writes `out` from `files` unless it is up to date. Returns whether it was rebuilt.
pub fn assemble(files: &[ImageFile], out: &Path) -> Result<bool> {
    let stamp = out.with_extension("sha256");
    let want = fingerprint(files)?;
    if out.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(false);
    }
    if let Some(d) = out.parent() {
        fs::create_dir_all(d)?;
    }
    // The image is written aside and renamed into place, and its stamp written last: an
    // interrupted or failed write (a full disk) leaves nothing that a later run would use.
    let _ = fs::remove_file(&stamp);
    let tmp = out.with_extension("tmp");
    let write = || -> Result<()> {
        let mut w = CpioWriter::new(BufWriter::new(fs::File::create(&tmp)?));
        for dir in ["proc", "sys", "dev", "tmp", "run"] {
            w.dir(dir)?;
        }
        for f in files {
            w.file_from(&f.dest, f.mode, &f.src)
                .with_context(|| format!("adding {} to the image", f.src.display()))?;
        }
        w.finish()?.flush()?;
        fs::rename(&tmp, out)?;
        fs::write(&stamp, &want)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        e.context(format!("writing the image {}", out.display()))
    })?;
    Ok(true)
}

/// Builds (if needed) the L1 base image from the kernel, guest programs and selftest.
pub fn l1_base_image(
    sh: &Shell,
    build_dir: &Path,
    kernel: &Path,
    guest_dir: &Path,
    selftest: &Path,
) -> Result<PathBuf> {
    let files = l1_files(sh, kernel, guest_dir, selftest)?;
    let out = build_dir.join("images/l1-base.cpio");
    if assemble(&files, &out)? {
        let size = fs::metadata(&out)?.len();
        progress::note(
            "images",
            format!("L1 image: {} files, {} MiB", files.len(), size >> 20),
        );
    }
    Ok(out)
}

/// A host file to ship to the guest's working directory, keeping its name and mode.
#[derive(Debug, Clone)]
pub struct UserFile {
    pub name: String,
    pub path: PathBuf,
}

impl UserFile {
    pub fn from_path(p: &Path) -> Result<Self> {
        let m = fs::metadata(p).map_err(|e| setup(format!("--file {}: {e}", p.display())))?;
        if !m.is_file() {
            return Err(setup(format!("--file {}: not a regular file", p.display())));
        }
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| setup(format!("--file {}: needs a UTF-8 file name", p.display())))?;
        Self::named(p, name)
    }

    /// A host file shipped under another name.
    pub fn named(p: &Path, name: &str) -> Result<Self> {
        if !p.is_file() {
            return Err(setup(format!("{}: not a regular file", p.display())));
        }
        Ok(Self {
            name: name.to_string(),
            path: p.to_path_buf(),
        })
    }
}

/// The initrd of one run: the base image with the job and its files appended.
pub fn run_initrd(base: &Path, job: &Job, files: &[UserFile], out: &Path) -> Result<()> {
    let mut names = std::collections::BTreeSet::new();
    for f in files {
        if !names.insert(&f.name) {
            return Err(setup(format!(
                "two --file arguments are named {:?}; the guest keeps file names, so they must differ",
                f.name
            )));
        }
    }
    let mut out_f = BufWriter::new(fs::File::create(out)?);
    std::io::copy(&mut fs::File::open(base)?, &mut out_f)?;
    let mut w = CpioWriter::new(out_f);
    let files: Vec<(String, &Path)> = files
        .iter()
        .map(|f| (f.name.clone(), f.path.as_path()))
        .collect();
    job.write_into(&mut w, &files)?;
    w.finish()?.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let e = parse_ldd("\tlibfoo.so.1 => not found\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("libfoo"), "{e}");
    }

    #[test]
    fn assemble_is_cached_and_run_initrd_appends_the_job() {
        let dir = std::env::temp_dir().join(format!("img-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        fs::write(&a, b"AAAA").unwrap();
        let files = vec![ImageFile {
            dest: "bin/a".into(),
            src: a.clone(),
            mode: 0o755,
        }];
        let base = dir.join("base.cpio");
        assert!(assemble(&files, &base).unwrap());
        assert!(!assemble(&files, &base).unwrap());
        let prog = dir.join("prog");
        fs::write(&prog, b"#!x").unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o750)).unwrap();
        let job = Job {
            level: exitlab_proto::job::Level::L1,
            steps: vec![],
        };
        let out = dir.join("run.cpio");
        let uf = UserFile::from_path(&prog).unwrap();
        run_initrd(&base, &job, std::slice::from_ref(&uf), &out).unwrap();
        let e = exitlab_proto::cpio::read_entries(&fs::read(&out).unwrap()).unwrap();
        let get = |n: &str| e.iter().find(|x| x.name == n).unwrap().clone();
        assert_eq!(get("bin/a").data, b"AAAA");
        assert_eq!(get("lab/files/prog").mode & 0o777, 0o750);
        assert_eq!(get("lab/files/prog").data, b"#!x");
        let parsed = Job::parse(
            std::str::from_utf8(&get("lab/job.json").data).unwrap(),
            exitlab_proto::job::Level::L1,
        )
        .unwrap();
        assert_eq!(parsed, job);
        let e = run_initrd(&base, &job, &[uf.clone(), uf], &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must differ"), "{e}");
        assert!(UserFile::from_path(&dir.join("missing")).is_err());
        assert!(UserFile::from_path(&dir).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
