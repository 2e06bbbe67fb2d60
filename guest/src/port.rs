//! The protocol serial port (`/dev/ttyS1`): typed messages out, typed messages in.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use exitlab_proto::msg::Msg;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg};

/// A cloneable sender of messages; every message is one `write` of one line, so messages
/// from several threads never interleave.
#[derive(Clone)]
pub struct Sender {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl Sender {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Arc::new(Mutex::new(out)),
        }
    }

    pub fn send(&self, msg: &Msg) {
        let line = msg.to_line();
        // A poisoned lock only means another sender panicked mid-write; keep reporting.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // Nothing sensible can be done if the port itself fails: the host sees a timeout
        // and keeps the console log, which says why.
        let _ = out.write_all(line.as_bytes()).and_then(|_| out.flush());
    }
}

/// Opens the protocol port; a serial port in raw mode (no echo, no line discipline
/// rewriting `\n`). A virtio serial port is not a terminal and needs nothing.
pub fn open_tty(path: &str) -> Result<(File, File)> {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the protocol port {path}"))?;
    if std::io::IsTerminal::is_terminal(&tty) {
        let mut t = termios::tcgetattr(tty.as_fd()).context("tcgetattr")?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(tty.as_fd(), SetArg::TCSANOW, &t).context("tcsetattr")?;
    }
    let reader = tty.try_clone().context("dup of the protocol port")?;
    Ok((tty, reader))
}

/// Sends a request that L1 answers (a checkpoint, a parameter to set) and waits for the
/// answer.
pub fn request<R: std::io::Read>(tx: &Sender, reader: &mut BufReader<R>, msg: &Msg) -> Result<()> {
    tx.send(msg);
    wait_resume(reader)
}

/// Waits until the port delivers `Msg::Resume` (or `Msg::Refused`), ignoring anything else.
fn wait_resume<R: std::io::Read>(reader: &mut BufReader<R>) -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .context("reading the protocol port")?
            == 0
        {
            anyhow::bail!("protocol port closed while waiting for resume");
        }
        match Msg::from_line(&line) {
            Ok(Msg::Resume) => return Ok(()),
            Ok(Msg::Refused { error }) => anyhow::bail!("L1 refused: {error}"),
            _ => {}
        }
    }
}

/// Blocks until what was written to the port has reached the host: a serial port drains
/// its transmitter; a virtio serial port may still hold the last message in its queue, so
/// the other side acknowledges it (`Msg::Resume`), waited for at most 10 s.
pub fn drain(tty: &File, reader: &mut BufReader<File>) {
    if std::io::IsTerminal::is_terminal(tty) {
        let _ = termios::tcdrain(tty.as_fd());
        return;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut line = String::new();
    loop {
        if reader.buffer().is_empty() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(reader.get_ref().as_fd(), PollFlags::POLLIN)];
            if ms == 0 || !matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0) {
                return;
            }
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if matches!(Msg::from_line(&line), Ok(Msg::Resume)) => return,
            Ok(_) => {}
        }
    }
}
