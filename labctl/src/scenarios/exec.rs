//! `labctl exec`: a command in L2, with host files copied into its working directory;
//! the command's status becomes labctl's.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use exitlab_proto::job::{Level, Step};

use crate::cli::{Global, LabArgs};
use crate::engine::{l2_vm, stream_output, write_results, Lab};
use crate::images::UserFile;
use crate::report::Body;
use crate::verify::Check;

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub lab: LabArgs,
    /// A host file to copy into L2's working directory (name and mode kept). Repeatable.
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// The command to run in L2 (relative paths are in the working directory).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

impl ExecArgs {
    pub fn run(self, g: &Global) -> Result<i32> {
        exec(&g.lab(self.lab)?, &self.files, &self.argv)
    }
}

/// Exit status of `labctl exec` when the command could not be started in the guest.
pub const EXEC_CANNOT_START: i32 = 127;

/// `labctl exec`: a command in L2, with host files copied in; its status becomes ours.
pub fn exec(lab: &Lab, files: &[PathBuf], argv: &[String]) -> Result<i32> {
    let files: Vec<UserFile> = files
        .iter()
        .map(|f| UserFile::from_path(f))
        .collect::<Result<_>>()?;
    let p = lab.build()?;
    let job = l2_vm(
        &lab.cfg,
        files.iter().map(|f| f.name.clone()).collect(),
        vec![Step::Run {
            argv: argv.to_vec(),
        }],
    );
    let run = lab.run(&p, "exec", &job, &files, stream_output(Level::L2))?;
    let status = run.programs(Level::L2).last().and_then(|r| r.status);
    let code = match status {
        Some(s) => s.shell_code(),
        None => EXEC_CANNOT_START,
    };
    let detail = match status {
        Some(s) => format!("{argv:?} in L2: {s}"),
        None => format!(
            "{argv:?} could not run in L2: {}",
            run.failures().join("; ")
        ),
    };
    let mut results = lab.results(
        &p,
        "exec",
        &run,
        vec![Check::new("exit-status", code == 0, &detail)],
    );
    results.exit_code = code;
    results.l2 = Some(lab.l2_report(&run));
    results.body = Some(Body::Exec {
        argv: argv.to_vec(),
        status: status.map(|s| s.to_string()),
    });
    let path = write_results(&results, &run)?;
    eprintln!("[exec] {detail}; results: {}", path.display());
    if code != 0 {
        eprintln!("[exec] logs:\n{}", run.logs.describe());
    }
    Ok(code)
}
