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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::record_boot::series::events;
    use crate::scenarios::record_boot::testdata::boot;

    #[test]
    fn csv_has_a_row_per_sample_with_phase_and_rate() {
        let r = Recorded::from_msgs(&boot());
        let text = super::csv(&r, &events(&r));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "t_s,phase,tag,exits,exit_cycles,exits_per_s,io_exits,cpuid_exits,cpuid_cycles,io_instruction_exits,io_instruction_cycles"
        );
        assert_eq!(lines.len(), 1 + r.points.len());
        assert_eq!(lines[1], "0.010000,firmware,,0,0,,0,0,0,0,0");
        assert_eq!(
            lines[3],
            "0.110000,kernel,,1000,100000,18000,500,250,25000,750,75000"
        );
        assert!(lines[7].starts_with("0.220000,idle,boot-done,4200,"));
        // A tag with a comma or a quote is quoted, and reads back whole.
        let mut r = r;
        r.points[0].tag = Some("a,\"b\"".into());
        let text = super::csv(&r, &events(&r));
        assert!(
            text.lines().nth(1).unwrap().contains(",\"a,\"\"b\"\"\","),
            "{text}"
        );
        let mut rd = ::csv::Reader::from_reader(text.as_bytes());
        let first = rd.records().next().unwrap().unwrap();
        assert_eq!(&first[2], "a,\"b\"");
        assert_eq!(first.len(), lines[0].split(',').count());
    }
}
