//! L1's sampler of the L2 VM's KVM statistics, for `record-boot`: a clock shared by the
//! periodic sampler and the checkpoints, readings that are monotonic in time, and a probe
//! of L1's own timer interrupts for samples that come late.

use std::collections::BTreeMap;
use std::fs::{self};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use exitlab_proto::job::Level;
use exitlab_proto::msg::{
    reason_updates, sample_values, Msg, ReasonTotals, Stream, SAMPLED_STATS, STAT_EXITS,
};

use crate::kvmstats;
use crate::port::Sender;

/// Microseconds since `start`: the clock of a recording.
pub(crate) fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// A recording's clock. Periodic samples and checkpoint samples come from two threads;
/// each takes its time and reads the counters under `lock`, so that the samples' order
/// in time is the order of the reads, and the series is monotonic in time.
#[derive(Clone)]
pub(crate) struct Clock {
    pub(crate) start: Instant,
    /// Taken for each sample.
    state: Arc<Mutex<ClockState>>,
}

#[derive(Default)]
struct ClockState {
    /// The statistics the VM had at its first sample.
    known: Option<Vec<String>>,
    /// The per-reason table as of the last sample (each sample carries what changed).
    reasons: ReasonTotals,
}

/// One reading: when, the [`SAMPLED_STATS`], and the reasons that changed since the last.
pub(crate) struct Reading {
    t_us: u64,
    stats: BTreeMap<String, u64>,
    reasons: Vec<[u64; 3]>,
}

impl Reading {
    pub(crate) fn msg(self, tag: Option<String>) -> Msg {
        Msg::Sample {
            t_us: self.t_us,
            tag,
            v: sample_values(&self.stats),
            r: self.reasons,
        }
    }
}

impl Clock {
    pub(crate) fn new(start: Instant) -> Self {
        Self {
            start,
            state: Arc::default(),
        }
    }

    /// The time, then the VM's sampled statistics (the exit count first), then its
    /// per-reason table: a per-reason sum is never below the exit count of its sample.
    ///
    /// The files are read one by one, and a sampling thread that is not the real-time
    /// sampler (a checkpoint's) can be preempted by L2's vCPUs between them: their exits
    /// would then be in the reasons but not in the exit count (8 of them once, at a phase
    /// boundary). So the exit count is read again after the reasons and the reading is
    /// retried while it moved, as a seqlock reader retries; what is left is one exit in
    /// flight per vCPU (counted by reason, not yet in `exits`).
    pub(crate) fn sample(&self, dir: &Path) -> Result<Reading, kvmstats::StatsError> {
        const TRIES: usize = 4;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut t_us, mut stats, mut reasons);
        let mut tries = 0;
        loop {
            tries += 1;
            t_us = micros(self.start);
            stats = kvmstats::read_some(dir, SAMPLED_STATS)?;
            reasons = kvmstats::read_reasons(dir);
            let again = kvmstats::read_some(dir, &[STAT_EXITS])?;
            if tries == TRIES || again.get(STAT_EXITS) == stats.get(STAT_EXITS) {
                break;
            }
        }
        // While KVM destroys the VM its files go one by one: a sample that lacks the exit
        // count, or any statistic the VM had before, is of a VM that is going away, not a
        // VM whose counters went back to zero.
        let names: Vec<String> = stats.keys().cloned().collect();
        let complete = match state.known.as_ref() {
            Some(first) => first.iter().all(|n| stats.contains_key(n)),
            None => stats.contains_key(STAT_EXITS),
        };
        let reasons_gone = reasons.is_none() && !state.reasons.is_empty();
        if !complete || reasons_gone {
            return Err(kvmstats::StatsError::VmGone);
        }
        state.known.get_or_insert(names);
        let reasons = reasons.unwrap_or_default();
        let updates = reason_updates(&state.reasons, &reasons);
        state.reasons = reasons;
        Ok(Reading {
            t_us,
            stats,
            reasons: updates,
        })
    }
}

/// Makes the calling thread real-time (SCHED_FIFO, the lowest priority): the sampler
/// wakes for a few microseconds every interval and must not wait behind L2's vCPU threads,
/// which keep L1's CPUs busy (with L1 on one vCPU, 1 in 100 samples came late without it).
pub(crate) fn realtime_priority(tx: &Sender) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads `param`, which outlives the call; 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tx.send(&Msg::Output {
            level: Level::L1,
            stream: Stream::Stderr,
            text: format!(
                "warning: the sampler cannot run at real-time priority ({}); samples may come late\n",
                std::io::Error::last_os_error()
            ),
        });
    }
}

/// Samples the VM's statistics every `interval` (on a fixed schedule: a late sample does
/// not shift the ones after it) from when KVM creates the VM until it is destroyed.
pub(crate) fn sample(
    pid: i32,
    clock: Clock,
    interval: Duration,
    stop: &Arc<AtomicBool>,
    tx: &Sender,
) -> thread::JoinHandle<()> {
    let (stop, tx) = (stop.clone(), tx.clone());
    thread::spawn(move || {
        realtime_priority(&tx);
        let dir = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(d) = kvmstats::debugfs_dir(pid) {
                break d;
            }
            thread::sleep(Duration::from_millis(1));
        };
        let created = clock.start.elapsed();
        tx.send(&Msg::VmCreated {
            created_us: created.as_micros() as u64,
        });
        let mut tick = created;
        let mut last = (clock.start.elapsed(), local_timer_interrupts());
        while !stop.load(Ordering::Relaxed) {
            let Ok(reading) = clock.sample(&dir) else {
                return; // the VM is gone
            };
            tx.send(&reading.msg(None));
            let now = clock.start.elapsed();
            let loc = local_timer_interrupts();
            if now - last.0 > 5 * interval {
                tx.send(&Msg::Console {
                    level: Level::L1,
                    line: format!(
                        "exitlab: the sampler ran {} ms after its previous sample (every {} ms); \
                         L1 took {} local timer interrupts meanwhile",
                        (now - last.0).as_millis(),
                        interval.as_millis(),
                        loc.zip(last.1)
                            .map_or("an unknown number of".into(), |(a, b)| (a - b).to_string()),
                    ),
                    t_us: Some(now.as_micros() as u64),
                });
            }
            last = (now, loc);
            while tick <= now {
                tick += interval;
            }
            thread::sleep(tick - now);
        }
    })
}

/// L1's local APIC timer interrupts so far (`LOC` in /proc/interrupts, summed over CPUs).
/// A late sample with many of them says L1's timer fired and the sampler was not run; with
/// none, that the timer interrupt itself did not reach L1 (docs/measurements.md, "Reliability").
pub(crate) fn local_timer_interrupts() -> Option<u64> {
    loc_interrupts(&fs::read_to_string("/proc/interrupts").ok()?)
}

fn loc_interrupts(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().starts_with("LOC:"))?;
    line.split_whitespace()
        .skip(1)
        .map_while(|w| w.parse::<u64>().ok())
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_timer_interrupts_are_summed_over_cpus() {
        let text = "           CPU0       CPU1\n  \
                    0:         40          0  IO-APIC   2-edge      timer\n\
                    NMI:          0          0   Non-maskable interrupts\n\
                    LOC:      12345        655   Local timer interrupts\n\
                    SPU:          0          0   Spurious interrupts\n";
        assert_eq!(loc_interrupts(text), Some(13000));
        assert_eq!(
            loc_interrupts("LOC:   7   Local timer interrupts\n"),
            Some(7)
        );
        assert_eq!(loc_interrupts("NMI: 0 Non-maskable interrupts\n"), None);
    }

    #[test]
    fn a_sample_of_a_vm_going_away_is_not_a_sample() {
        let dir = std::env::temp_dir().join(format!("clock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in SAMPLED_STATS {
            fs::write(dir.join(name), "7\n").unwrap();
        }
        fs::write(
            dir.join("exit_reasons"),
            "code sdm exits cycles\n0x72 10 5 100\n0x7b 30 2 40\n",
        )
        .unwrap();
        let clock = Clock::new(Instant::now());
        let first = clock.sample(&dir).unwrap();
        assert_eq!(first.stats.len(), SAMPLED_STATS.len());
        assert_eq!(first.reasons, vec![[10, 5, 100], [30, 2, 40]]);
        // The next sample carries only what changed.
        fs::write(
            dir.join("exit_reasons"),
            "code sdm exits cycles\n0x72 10 6 130\n0x7b 30 2 40\n",
        )
        .unwrap();
        assert_eq!(clock.sample(&dir).unwrap().reasons, vec![[10, 6, 130]]);
        // The per-reason file going is the VM going.
        fs::remove_file(dir.join("exit_reasons")).unwrap();
        assert!(matches!(
            clock.sample(&dir),
            Err(kvmstats::StatsError::VmGone)
        ));
        fs::write(dir.join("exit_reasons"), "code sdm exits cycles\n").unwrap();
        // KVM removes the VM's files one by one: the exit count is still there, others not.
        fs::remove_file(dir.join(SAMPLED_STATS.last().unwrap())).unwrap();
        assert!(matches!(
            clock.sample(&dir),
            Err(kvmstats::StatsError::VmGone)
        ));
        // A first sample needs the exit count.
        fs::remove_file(dir.join(STAT_EXITS)).unwrap();
        assert!(matches!(
            Clock::new(Instant::now()).sample(&dir),
            Err(kvmstats::StatsError::VmGone)
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
