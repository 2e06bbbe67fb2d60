//! One labctl at a time per build directory.
//!
//! Two runs on one build directory would rebuild the same kernel tree and image under each
//! other, and two nested labs on a small machine starve each other's emulated CPUs. So a
//! command that uses a build directory holds an exclusive `flock` on `<build>/.labctl.lock`
//! for as long as it runs; a second one says who holds it and waits. The kernel drops the
//! lock when its holder exits, however it exits, so a killed labctl never leaves it stale.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};

use crate::progress;

/// Held for as long as labctl uses the build directory.
#[derive(Debug)]
pub struct BuildLock {
    _file: File,
}

fn flock(f: &File, flags: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), flags) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl BuildLock {
    /// Takes the lock of `build_dir`, waiting (and saying so) while another labctl has it.
    pub fn acquire(build_dir: &Path) -> Result<Self> {
        fs::create_dir_all(build_dir)
            .with_context(|| format!("creating the build directory {}", build_dir.display()))?;
        let path = build_dir.join(".labctl.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            progress::note(
                "lock",
                format!(
                    "waiting for another labctl using {} ({}); stop it, or give this one another --build-dir",
                    build_dir.display(),
                    holder.trim()
                ),
            );
            flock(&file, libc::LOCK_EX).with_context(|| format!("locking {}", path.display()))?;
        }
        let me = format!(
            "pid {}: {}",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(me.as_bytes())?;
        Ok(Self { _file: file })
    }
}

/// Whether an error is a full disk anywhere in its chain (or in the output it quotes).
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
            || c.to_string().contains("No space left on device")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_the_lock_says_who_has_it() {
        let dir = std::env::temp_dir().join(format!("labctl-lock-{}", std::process::id()));
        let first = BuildLock::acquire(&dir).unwrap();
        let path = dir.join(".labctl.lock");
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!("pid {}:", std::process::id())),
            "{text}"
        );
        // Another open file description cannot take it while the first is held.
        let other = File::open(&path).unwrap();
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).is_err());
        drop(first);
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).is_ok());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn full_disks_are_recognized() {
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("writing the image");
        assert!(is_disk_full(&e));
        assert!(is_disk_full(&anyhow::anyhow!(
            "make failed:\ncc1: fatal error: No space left on device"
        )));
        assert!(!is_disk_full(&anyhow::anyhow!("something else")));
    }
}
