//! labctl's failures, each with its own exit status.

use exitlab_proto::job::Level;

/// Exit statuses (also documented in README.md, docs/usage.md and `labctl --help`).
pub mod code {
    /// A scenario ran, and one of its checks failed.
    pub const SCENARIO_FAILED: u8 = 1;
    /// The lab could not run: a missing tool or package, bad input, a build that failed.
    pub const SETUP: u8 = 2;
    /// A VM did not finish in time (hang); it was killed.
    pub const TIMEOUT: u8 = 124;
    /// A guest kernel (L1 or L2) panicked.
    pub const PANIC: u8 = 125;
    /// QEMU crashed or was killed, or a VM stopped without reporting.
    pub const VM_CRASHED: u8 = 126;

    /// A scenario's exit status from whether its checks all passed.
    pub fn of_checks(ok: bool) -> i32 {
        if ok {
            0
        } else {
            SCENARIO_FAILED.into()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Setup(String),
    #[error("{level} kernel panicked: {line}\n{logs}")]
    Panic {
        level: Level,
        line: String,
        logs: String,
    },
    #[error("timed out after {seconds} s: {what}; the VM was killed\n{logs}")]
    Timeout {
        seconds: u64,
        what: String,
        logs: String,
    },
    #[error("{what}\n{logs}")]
    VmCrashed { what: String, logs: String },
}

impl LabError {
    pub fn exit_code(&self) -> u8 {
        match self {
            LabError::Setup(_) => code::SETUP,
            LabError::Panic { .. } => code::PANIC,
            LabError::Timeout { .. } => code::TIMEOUT,
            LabError::VmCrashed { .. } => code::VM_CRASHED,
        }
    }
}

/// A setup error with a message that says what to do.
pub fn setup(msg: impl Into<String>) -> anyhow::Error {
    LabError::Setup(msg.into()).into()
}
