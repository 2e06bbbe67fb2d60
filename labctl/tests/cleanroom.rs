//! The README's quick start, the way a new user meets it: on a fresh Debian 12 root with
//! nothing but a Rust toolchain (scripts/clean-room). A package the lab needs that is not in
//! scripts/deps.list fails this test, as it would fail the user (rsync once did).

use std::path::Path;
use std::process::Command;

#[test]
fn the_quick_start_passes_on_a_fresh_debian_root() {
    assert!(
        nix_is_root(),
        "the clean-room test needs root (debootstrap, chroot); run the tests as root, as CI does"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(repo.join("scripts/clean-room"))
        .output()
        .expect("running scripts/clean-room");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "the quick start failed in the clean root ({})",
        out.status
    );
    // Each README command ran and said what the README says it says.
    for expected in [
        "[clean-room] $ scripts/run-lab",
        "install-deps: installing",
        "CPUID(0x4FFFFFFF), exits=",
        "[clean-room] $ labctl doctor",
        "Everything the lab needs is present.",
        "[clean-room] $ labctl selftest",
        "[clean-room] the quick start passed",
    ] {
        assert!(
            text.contains(expected),
            "the clean-room log lacks {expected:?}"
        );
    }
    // Every check of the lab and of the selftest passed, no-stalls included.
    let checks: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.first() == Some(&"check"))
        .collect();
    for name in ["matches-kvm-stats", "no-stalls", "all-cases-passed"] {
        assert!(
            checks.iter().any(|w| w.get(1) == Some(&name)),
            "no {name} check in the clean-room log"
        );
    }
    let failed: Vec<_> = checks.iter().filter(|w| w.get(2) != Some(&"ok")).collect();
    assert!(failed.is_empty(), "checks failed: {failed:?}");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
