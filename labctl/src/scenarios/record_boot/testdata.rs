//! A synthetic recording for the tests: a boot's samples, console markers, the guest's
//! reading between its checkpoints, and the VM's exit.

use exitlab_proto::job::Level;
use exitlab_proto::msg::{Msg, Stream, STAT_EXITS, STAT_EXIT_CYCLES};

use super::series::{AFTER, BEFORE, IDLE_END};

pub fn point(t_ms: u64, exits: u64, tag: Option<&str>) -> Msg {
    Msg::Sample {
        t_us: t_ms * 1000,
        tag: tag.map(String::from),
        v: exitlab_proto::msg::sample_values(
            &[
                (STAT_EXITS.to_string(), exits),
                (STAT_EXIT_CYCLES.to_string(), exits * 100),
                ("io_exits".to_string(), exits / 2),
            ]
            .into(),
        ),
        // A quarter CPUID, the rest I/O; every sample carries both (unchanged ones too,
        // which is harmless).
        r: vec![
            [10, exits / 4, exits * 25],
            [30, exits - exits / 4, exits * 75],
        ],
    }
}

pub fn console(t_ms: u64, line: &str) -> Msg {
    Msg::Console {
        level: Level::L2,
        line: line.into(),
        t_us: Some(t_ms * 1000),
    }
}

pub fn boot() -> Vec<Msg> {
    vec![
        Msg::VmCreated { created_us: 10_000 },
        point(10, 0, None),
        point(60, 100, None),
        console(70, "Linux version 6.12.117"),
        point(110, 1000, None),
        point(160, 3000, None),
        console(170, "Run /init as init process"),
        point(210, 4000, None),
        point(215, 4100, Some(BEFORE)),
        Msg::Output {
            level: Level::L2,
            stream: Stream::Stdout,
            text: "CPUID(0x4FFFFFFF), exits=4101, cycles spent in exit=410050\n".into(),
        },
        point(220, 4200, Some(AFTER)),
        point(240, 4250, None),
        point(250, 4260, Some(IDLE_END)),
        point(260, 4300, None),
        Msg::VmExited {
            status: exitlab_proto::msg::Status::Code(0),
            t_us: Some(280_000),
        },
    ]
}
