//! The series' checks: counters only grow, phases in order, the guest's reading between
//! its checkpoints, per-reason sums, the sampler's schedule, the idle period as asked.

use exitlab_proto::leaf::ExitStats;
use exitlab_proto::msg::{STAT_EXITS, STAT_EXIT_CYCLES};

use super::series::{boundaries, secs, Events, Phase, Point, Recorded, AFTER, BEFORE};
use crate::verify::Check;

/// The series' checks: monotonic counters, phases in order, the guest's reading inside
/// its checkpoints, and the sampling interval kept.
pub fn checks(r: &Recorded, e: &Events, interval_ms: u32) -> Vec<Check> {
    let mut c = Vec::new();
    let n = r.points.len();
    c.push(Check::new(
        "sampled",
        n >= 2,
        format!("{n} samples of the VM's statistics"),
    ));
    let backwards: Vec<String> = r
        .points
        .windows(2)
        .flat_map(|w| {
            w[0].stats
                .keys()
                .map(|k| (k, w[1].stats.get(k).copied().unwrap_or(0)))
                .filter(|(k, v)| *v < w[0].get(k))
                .map(|(k, v)| format!("{k} {} -> {v} at {:.3} s", w[0].get(k), secs(w[1].t_us)))
                .collect::<Vec<_>>()
        })
        .collect();
    c.push(Check::new(
        "monotonic",
        backwards.is_empty() && n >= 2,
        if backwards.is_empty() {
            "every counter only grows from sample to sample".to_string()
        } else {
            format!("counters went backwards: {}", backwards.join("; "))
        },
    ));
    let b = boundaries(e);
    let missing: Vec<&str> = [
        "VM created",
        "kernel banner",
        "first process",
        "boot done",
        "idle end",
        "VM exited",
    ]
    .iter()
    .zip(b)
    .filter(|(_, t)| t.is_none())
    .map(|(n, _)| *n)
    .collect();
    let times: Vec<u64> = b.iter().flatten().copied().collect();
    let ordered = times.windows(2).all(|w| w[0] <= w[1]);
    c.push(Check::new(
        "phases",
        missing.is_empty() && ordered,
        if !missing.is_empty() {
            format!("missing: {}", missing.join(", "))
        } else if !ordered {
            format!("out of order: {times:?} µs")
        } else {
            format!(
                "firmware, kernel, userspace, idle, shutdown in order: {}",
                times
                    .iter()
                    .map(|t| format!("{:.2}", secs(*t)))
                    .collect::<Vec<_>>()
                    .join(" < ")
            )
        },
    ));
    let reading = r
        .reading_line
        .as_deref()
        .and_then(|l| l.parse::<ExitStats>().ok());
    let (before, after) = (r.tagged(BEFORE), r.tagged(AFTER));
    c.push(match (reading, before, after) {
        (Some(g), Some(s1), Some(s2)) => {
            let (e1, e2) = (s1.get(STAT_EXITS), s2.get(STAT_EXITS));
            let (c1, c2) = (s1.get(STAT_EXIT_CYCLES), s2.get(STAT_EXIT_CYCLES));
            let ok = e1 < u64::from(g.exits) && u64::from(g.exits) <= e2 && c1 <= g.cycles && g.cycles <= c2;
            Check::new(
                "guest-reading",
                ok,
                format!(
                    "exits {e1} < {} <= {e2} and cycles {c1} <= {} <= {c2} (checkpoints {BEFORE}, {AFTER})",
                    g.exits, g.cycles
                ),
            )
        }
        _ => Check::new(
            "guest-reading",
            false,
            format!(
                "missing: {}",
                [
                    (reading.is_none(), "the guest's reading"),
                    (before.is_none(), BEFORE),
                    (after.is_none(), AFTER),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, w)| *w)
                .collect::<Vec<_>>()
                .join(", ")
            ),
        ),
    });
    // Periodic samples only: checkpoints come in between.
    let periodic: Vec<u64> = r
        .points
        .iter()
        .filter(|p| p.tag.is_none())
        .map(|p| p.t_us)
        .collect();
    c.push(interval_check(&periodic, interval_ms));
    c
}

/// `per-reason-sum`: at every sample the exits by reason add up to the exit count. KVM
/// counts an exit in its reason right after the hardware VM-exit, before `stat.exits`, and
/// L1 reads the exit count before the reasons: so each sample's sum is at least its exit
/// count, and at most the next sample's plus one exit in flight per vCPU.
pub fn reason_sum_check(r: &Recorded, vcpus: u32) -> Check {
    let name = "per-reason-sum";
    if r.points.iter().all(|p| p.reasons.is_empty()) {
        return Check::new(
            name,
            false,
            "no sample has per-reason counters (the VM's debugfs exit_reasons file): is L1 running the lab's patched KVM?",
        );
    }
    // KVM lists only the reasons that occurred: before the first exit the table is empty.
    let missing = r
        .points
        .iter()
        .filter(|p| p.reasons.is_empty() && p.get(STAT_EXITS) > 0)
        .count();
    let bad: Vec<String> = r
        .points
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let sum = p.reason_exits().unwrap_or(0);
            let lo = p.get(STAT_EXITS);
            let next = r.points.get(i + 1).map(|n| n.get(STAT_EXITS));
            let hi = next.map(|n| n + u64::from(vcpus));
            (sum < lo || hi.is_some_and(|hi| sum > hi)).then(|| {
                format!(
                    "at {:.3} s: {sum} by reason, exits {lo}{}",
                    secs(p.t_us),
                    next.map_or(String::new(), |n| format!(", next {n}"))
                )
            })
        })
        .collect();
    let last = r.points.last();
    Check::new(
        name,
        bad.is_empty() && missing == 0,
        if missing > 0 {
            format!(
                "{missing} of {} samples with exits have no per-reason counters",
                r.points.len()
            )
        } else if !bad.is_empty() {
            format!(
                "{} of {} samples off: {}",
                bad.len(),
                r.points.len(),
                bad.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
            )
        } else {
            format!(
                "{} samples: exits <= sum by reason <= next sample's exits + {vcpus} (in flight); last: {} by reason, {} exits",
                r.points.len(),
                last.and_then(Point::reason_exits).unwrap_or(0),
                last.map_or(0, |p| p.get(STAT_EXITS))
            )
        },
    )
}

/// The sampler keeps its schedule: the median gap is the interval (within 10 %), and at
/// least 99 % of gaps are under 1.5 intervals. L1 is itself emulated, so now and then it
/// misses a tick (a gap of two intervals); those are counted, not failed.
pub fn interval_check(times_us: &[u64], interval_ms: u32) -> Check {
    let want = f64::from(interval_ms) * 1000.0;
    let mut gaps: Vec<f64> = times_us.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    gaps.sort_by(f64::total_cmp);
    let Some(&median) = gaps.get(gaps.len() / 2) else {
        return Check::new("interval", false, "fewer than two periodic samples");
    };
    let late = gaps.iter().filter(|g| **g > 1.5 * want).count();
    let worst = gaps.last().copied().unwrap_or(0.0);
    let ok = (median - want).abs() <= 0.1 * want && late * 100 <= gaps.len();
    Check::new(
        "interval",
        ok,
        format!(
            "median gap {:.1} ms (goal {interval_ms} ms +-10%), {late} of {} gaps over 1.5 intervals (goal <= 1%), largest {:.1} ms",
            median / 1000.0,
            gaps.len(),
            worst / 1000.0
        ),
    )
}

/// `idle-as-asked`: the booted guest idled as long as asked, within 10 % (at least
/// 0.1 s): a guest whose timers fire late sleeps on, and its idle figures mean nothing.
pub fn idle_check(phases: &[Phase], asked_s: u32) -> Option<Check> {
    let p = phases.iter().find(|p| p.name == "idle")?;
    let (secs, asked) = (p.end_s - p.start_s, f64::from(asked_s));
    let slack = (asked * 0.1).max(0.1);
    Some(Check::new(
        "idle-as-asked",
        secs >= asked && secs <= asked + slack,
        format!(
            "idle phase {secs:.2} s for the {asked_s} s asked (goal: within {slack:.2} s over)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::record_boot::series::{events, phases};
    use crate::scenarios::record_boot::testdata::{boot, point};
    use crate::verify;
    use exitlab_proto::msg::Msg;
    use std::collections::BTreeMap;

    #[test]
    fn idle_must_last_what_was_asked() {
        let phase = |name, start_s, end_s| Phase {
            name,
            start_s,
            end_s,
            exits: 0,
            exit_cycles: 0,
            exits_per_s: 0.0,
            peak_exits_per_s: 0.0,
            kinds: BTreeMap::new(),
            reasons: vec![],
        };
        let ok = |start, end, asked| {
            idle_check(
                &[phase("kernel", 0.0, 1.0), phase("idle", start, end)],
                asked,
            )
            .unwrap()
            .ok
        };
        assert!(ok(6.65, 11.70, 5));
        assert!(!ok(6.65, 45.0, 5), "a guest that slept on");
        assert!(!ok(6.0, 10.0, 5), "a short idle");
        assert!(ok(2.0, 3.08, 1));
        assert!(idle_check(&[phase("kernel", 0.0, 1.0)], 5).is_none());
    }

    #[test]
    fn a_good_series_passes_every_check() {
        let r = Recorded::from_msgs(&boot());
        let c = checks(&r, &events(&r), 50);
        assert!(verify::all_ok(&c), "{c:#?}");
        let c = reason_sum_check(&r, 1);
        assert!(c.ok, "{c:?}");
    }

    #[test]
    fn bad_series_fail_with_reasons() {
        // A counter going backwards.
        let mut m = boot();
        m.insert(5, point(120, 900, None));
        let r = Recorded::from_msgs(&m);
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "monotonic" && !c.ok));
        // A reading outside its checkpoints.
        let m: Vec<Msg> = boot()
            .into_iter()
            .map(|m| match m {
                Msg::Output { level, stream, .. } => Msg::Output {
                    level,
                    stream,
                    text: "CPUID(0x4FFFFFFF), exits=4100, cycles spent in exit=410050\n".into(),
                },
                m => m,
            })
            .collect();
        let r = Recorded::from_msgs(&m);
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "guest-reading" && !c.ok));
        // A boot that never got to userspace: phases missing, the rest still sliced.
        let m: Vec<Msg> = boot().into_iter().take(6).collect();
        let r = Recorded::from_msgs(&m);
        let e = events(&r);
        let c = checks(&r, &e, 50);
        let phases_check = c.iter().find(|c| c.name == "phases").unwrap();
        assert!(!phases_check.ok);
        assert!(phases_check.detail.contains("first process"));
        assert_eq!(phases(&r, &e).len(), 2);
        // A sample of a VM being destroyed (no exit count) is not a reading.
        let mut m = boot();
        m.push(Msg::Sample {
            t_us: 290_000,
            tag: None,
            v: exitlab_proto::msg::sample_values(&[("io_exits".to_string(), 1)].into()),
            r: vec![],
        });
        let r = Recorded::from_msgs(&m);
        assert_eq!(r.points.last().unwrap().get(STAT_EXITS), 4300);
        // A counter that vanishes from one sample to the next is flagged.
        let mut r = Recorded::from_msgs(&boot());
        r.points[3].stats.remove("io_exits");
        let c = checks(&r, &events(&r), 50);
        assert!(c.iter().any(|c| c.name == "monotonic" && !c.ok));
        // A sampler off its schedule.
        let r = Recorded::from_msgs(&boot());
        let c = checks(&r, &events(&r), 20);
        assert!(c.iter().any(|c| c.name == "interval" && !c.ok));
    }

    #[test]
    fn the_interval_check_counts_missed_ticks_and_fails_a_drifting_sampler() {
        let steady: Vec<u64> = (0..200).map(|i| i * 20_000).collect();
        assert!(interval_check(&steady, 20).ok);
        // One missed tick in 200: counted, not failed.
        let missed: Vec<u64> = steady.iter().copied().filter(|t| *t != 2_000_000).collect();
        let c = interval_check(&missed, 20);
        assert!(c.ok && c.detail.contains("1 of 198"), "{}", c.detail);
        // Every fifth tick missed: fails.
        let bad: Vec<u64> = steady
            .iter()
            .copied()
            .filter(|t| t % 100_000 != 0)
            .collect();
        assert!(!interval_check(&bad, 20).ok);
        // Sampling at 30 ms when 20 was asked: fails.
        let slow: Vec<u64> = (0..100).map(|i| i * 30_000).collect();
        assert!(!interval_check(&slow, 20).ok);
        assert!(!interval_check(&[5], 20).ok);
    }
}
