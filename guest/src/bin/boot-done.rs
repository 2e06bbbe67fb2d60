//! `boot-done`: the last unit of a foreign guest's boot (record-boot's Debian image runs
//! it from systemd once multi-user.target is reached). Over the protocol port it has L1
//! take the VM's statistics, reads CPUID 0x4FFFFFFF, has L1 take them again, and prints the
//! reading. The bracketing checkpoints give the reading's exact relation to the host's
//! series: `before < EAX <= after`. Then the guest idles for `exitlab.idle_ms=N` (kernel
//! command line; default 0), a last checkpoint marks the start of the shutdown, and the
//! guest powers off.

use std::io::BufReader;
use std::process::ExitCode;

use anyhow::{Context, Result};
use exitlab_guest::{init, leaf, port};
use exitlab_proto::job::Level;
use exitlab_proto::msg::{Msg, Stream};
use exitlab_proto::vm::PROTO_TTY;

/// The checkpoint tags, in order (labctl's record-boot looks for them).
const BEFORE: &str = "boot-done-before";
const AFTER: &str = "boot-done";
const IDLE_END: &str = "idle-end";

/// `exitlab.idle_ms=N` from a kernel command line.
fn idle_ms(cmdline: &str) -> Result<u64> {
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("exitlab.idle_ms="))
    {
        None => Ok(0),
        Some(v) => v
            .parse()
            .with_context(|| format!("exitlab.idle_ms={v} on the kernel command line")),
    }
}

fn run() -> Result<()> {
    let (tty, reader) = port::open_tty(PROTO_TTY)?;
    let tx = port::Sender::new(Box::new(tty.try_clone().context("dup of the port")?));
    let mut reader = BufReader::new(reader);
    tx.send(&init::hello(Level::L2));
    let checkpoint = |tag: &str, reader: &mut BufReader<_>| {
        port::request(&tx, reader, &Msg::Checkpoint { tag: tag.into() })
            .with_context(|| format!("checkpoint {tag}"))
    };
    checkpoint(BEFORE, &mut reader)?;
    let stats = leaf::read().context("reading CPUID 0x4FFFFFFF")?;
    let line = format!("{stats}\n");
    tx.send(&Msg::Output {
        level: Level::L2,
        stream: Stream::Stdout,
        text: line.clone(),
    });
    checkpoint(AFTER, &mut reader)?;
    print!("{line}");
    let idle = idle_ms(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())?;
    std::thread::sleep(std::time::Duration::from_millis(idle));
    checkpoint(IDLE_END, &mut reader)?;
    tx.send(&Msg::Done {
        level: Level::L2,
        ok: true,
    });
    port::drain(&tty, &mut reader);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot-done: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn idle_comes_from_the_command_line() {
        assert_eq!(super::idle_ms("root=/dev/vda ro").unwrap(), 0);
        assert_eq!(
            super::idle_ms("ro exitlab.idle_ms=5000 quiet").unwrap(),
            5000
        );
        assert!(super::idle_ms("exitlab.idle_ms=soon").is_err());
    }
}
