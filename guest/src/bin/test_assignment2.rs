//! The assignment's test program: executes CPUID 0x4FFFFFFF once and prints
//! `CPUID(0x4FFFFFFF), exits=<EAX>, cycles spent in exit=<EBX:ECX>`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match exitlab_guest::leaf::read() {
        Ok(stats) => {
            println!("{stats}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("test_assignment2: {e}");
            ExitCode::FAILURE
        }
    }
}
