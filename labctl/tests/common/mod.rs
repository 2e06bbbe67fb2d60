//! What the end-to-end test files share: the repository, one boot at a time, and running
//! labctl with its output shown when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

static LAB: Mutex<()> = Mutex::new(());

/// Serializes tests that boot the lab or use the shared build directory (the machine has
/// few cores); a failed test does not poison the others.
pub fn lab_lock() -> MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `labctl ARGS` in the repository, with prebuilt-artifact variables of the caller's
/// environment removed; its output is printed for the test log.
pub fn labctl(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_labctl"))
        .args(args)
        .current_dir(repo())
        .env_remove("LABCTL_KERNEL")
        .env_remove("LABCTL_L1_IMAGE")
        .output()
        .expect("running labctl");
    eprintln!(
        "$ labctl {}\n--- stdout\n{}--- stderr\n{}--- status {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    out
}
