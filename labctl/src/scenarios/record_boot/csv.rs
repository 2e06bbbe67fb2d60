//! The series as CSV (samples.csv), through the `csv` crate.

use exitlab_proto::msg::{STAT_EXITS, STAT_EXIT_CYCLES};
use exitlab_proto::reasons::sdm_name;

use super::series::{boundaries, rates, secs, Events, Recorded, PHASES};

/// A reason's CSV column stem: its SDM name in lower case (`cpuid`, `ept_violation`).
pub fn reason_column(reason: u32) -> String {
    match sdm_name(reason) {
        Some(n) => n.to_lowercase(),
        None => format!("reason_{reason}"),
    }
}

/// The series as CSV: one row per sample; after KVM's per-kind counters, the exits and
/// the cycles of each reason the recording saw (`<reason>_exits`, `<reason>_cycles`,
/// cumulative like the other counters).
pub fn csv(r: &Recorded, e: &Events) -> String {
    let reasons: Vec<u32> = r
        .points
        .iter()
        .flat_map(|p| p.reasons.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let reason_cols: Vec<String> = reasons
        .iter()
        .flat_map(|r| {
            let c = reason_column(*r);
            [format!("{c}_exits"), format!("{c}_cycles")]
        })
        .collect();
    let kinds: Vec<String> = r
        .points
        .iter()
        .flat_map(|p| p.stats.keys().cloned())
        .filter(|k| k != STAT_EXITS && k != STAT_EXIT_CYCLES)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let b = boundaries(e);
    let phase_at = |t: u64| {
        PHASES
            .iter()
            .enumerate()
            .rev()
            .find(|(i, _)| b[*i].is_some_and(|s| t >= s))
            .map_or("", |(_, n)| n)
    };
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let header = ["t_s", "phase", "tag", "exits", "exit_cycles", "exits_per_s"]
        .into_iter()
        .map(String::from)
        .chain(kinds.iter().cloned())
        .chain(reason_cols);
    w.write_record(header).expect("writing to memory");
    for (p, rate) in r.points.iter().zip(rates(r)) {
        let rate = rate.map_or(String::new(), |x| format!("{x:.0}"));
        let mut row = vec![
            format!("{:.6}", secs(p.t_us)),
            phase_at(p.t_us).to_string(),
            p.tag.clone().unwrap_or_default(),
            p.get(STAT_EXITS).to_string(),
            p.get(STAT_EXIT_CYCLES).to_string(),
            rate,
        ];
        row.extend(kinds.iter().map(|k| p.get(k).to_string()));
        for reason in &reasons {
            let c = p.reasons.get(reason).copied().unwrap_or_default();
            row.extend([c.exits.to_string(), c.cycles.to_string()]);
        }
        w.write_record(&row).expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("writing to memory")).expect("the fields are UTF-8")
}
