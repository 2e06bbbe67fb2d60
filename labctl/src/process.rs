//! No child process outlives labctl: QEMU, make and the recipe's build get a signal when
//! labctl dies, however it dies.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s process get `signal` when labctl dies (Ctrl-C, `kill`, a panic), so that
/// no QEMU or make is left running behind a labctl that is gone.
pub fn die_with_labctl(cmd: &mut Command, signal: libc::c_int) -> &mut Command {
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated after fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // labctl may have died between fork and prctl.
            if libc::getppid() == 1 {
                libc::raise(signal);
            }
            Ok(())
        })
    }
}
