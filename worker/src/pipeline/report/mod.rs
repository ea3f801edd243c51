//! The results of a run: per method (and IRO iteration), the mean evaluation reward with its standard error,
//! win rates against the reference and against the base policy on the same prompts, response length, the KL
//! bound to the base policy, tokens sampled and wall time. Written as `report/summary.json`,
//! `report/summary.md` and `report/reward.png`, computed from the accepted eval shards only.

mod plot;
mod png;

use std::collections::HashMap;

use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{EvalRecord, read_accepted, read_manifest};
use iro_common::store::Store;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A mean and its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub se: f64,
}

/// One line of the results table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    /// `base`, `best_of_n`, `args`, `weak_to_strong`, or `iro`.
    pub method: String,
    /// IRO's iteration (baselines: the iteration whose eval ran them, 1).
    pub iteration: u32,
    pub prompts: usize,
    pub reward: Estimate,
    /// Share of prompts where the answer's reward beats the reference's (ties count half); `None` when the
    /// reward compares with the reference itself.
    pub win_rate_vs_reference: Option<Estimate>,
    /// Share of prompts where the answer beats the base policy's answer to the same prompt (ties half).
    pub win_rate_vs_base: Option<Estimate>,
    pub mean_length: f64,
    /// Mean per-prompt upper bound on KL(method ‖ base) in nats, when the method has one.
    pub kl_bound: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
}

impl SummaryRow {
    /// How the row is labelled in tables and plots.
    pub fn label(&self) -> String {
        if self.method == "iro" { format!("iro iter {}", self.iteration) } else { self.method.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub rows: Vec<SummaryRow>,
}

/// Mean and standard error (sample standard deviation / √n; 0 for a single value).
pub fn estimate(xs: &[f64]) -> Estimate {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return Estimate { mean: f64::NAN, se: f64::NAN };
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return Estimate { mean, se: 0.0 };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Estimate { mean, se: (var / n).sqrt() }
}

/// 1 for a win, ½ for a tie, 0 for a loss.
fn win(a: f64, b: f64) -> f64 {
    if a > b {
        1.0
    } else if a == b {
        0.5
    } else {
        0.0
    }
}

const METHOD_ORDER: [&str; 5] = ["base", "best_of_n", "args", "weak_to_strong", "iro"];

/// The results table of a set of eval rows (rows without a reward are skipped).
pub fn summarize(records: &[EvalRecord]) -> Vec<SummaryRow> {
    let base: HashMap<&str, f64> = records
        .iter()
        .filter(|r| r.method == "base")
        .filter_map(|r| r.reward.map(|x| (r.prompt_id.as_str(), x)))
        .collect();
    // (method order, iteration, method) → its rows, in first-seen order until sorted.
    type Key = (usize, u32, String);
    let mut groups: Vec<(Key, Vec<&EvalRecord>)> = Vec::new();
    for r in records.iter().filter(|r| r.reward.is_some()) {
        let order = METHOD_ORDER.iter().position(|m| *m == r.method).unwrap_or(METHOD_ORDER.len());
        let key = (order, r.iteration, r.method.clone());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, rows)) => rows.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    groups
        .into_iter()
        .map(|((_, iteration, method), rows)| {
            let rewards: Vec<f64> = rows.iter().filter_map(|r| r.reward).collect();
            let vs_ref: Option<Vec<f64>> =
                rows.iter().map(|r| Some(win(r.reward?, r.reference_reward?))).collect::<Option<Vec<f64>>>();
            let vs_base: Vec<f64> =
                rows.iter().filter_map(|r| Some(win(r.reward?, *base.get(r.prompt_id.as_str())?))).collect();
            let kl: Option<Vec<f64>> = rows.iter().map(|r| r.kl_bound).collect();
            SummaryRow {
                prompts: rows.len(),
                reward: estimate(&rewards),
                win_rate_vs_reference: vs_ref.filter(|v| !v.is_empty()).map(|v| estimate(&v)),
                win_rate_vs_base: (method != "base" && !vs_base.is_empty()).then(|| estimate(&vs_base)),
                mean_length: rows.iter().map(|r| r.length as f64).sum::<f64>() / rows.len() as f64,
                kl_bound: kl.map(|k| k.iter().sum::<f64>() / k.len() as f64),
                tokens: rows.iter().map(|r| r.tokens).sum(),
                seconds: rows.iter().map(|r| r.seconds).sum(),
                method,
                iteration,
            }
        })
        .collect()
}

fn pct(e: &Option<Estimate>) -> String {
    e.map_or("n/a".into(), |e| format!("{:.1} ± {:.1}", 100.0 * e.mean, 100.0 * e.se))
}

/// The table as Markdown (also what `iro run` prints).
pub fn markdown(summary: &Summary) -> String {
    let mut s = format!(
        "# Results of run `{}`\n\nMean evaluation reward ± standard error over the held-out prompts; win rates in %.\n\n",
        summary.run_id
    );
    s.push_str("| method | prompts | reward | win % vs reference | win % vs base | mean length | KL bound (nats) | tokens sampled | seconds |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in &summary.rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} ± {:.4} | {} | {} | {:.1} | {} | {} | {:.1} |\n",
            r.label(),
            r.prompts,
            r.reward.mean,
            r.reward.se,
            pct(&r.win_rate_vs_reference),
            pct(&r.win_rate_vs_base),
            r.mean_length,
            r.kl_bound.map_or("n/a".into(), |k| format!("{k:.2}")),
            r.tokens,
            r.seconds
        ));
    }
    s
}

/// Reads every iteration's accepted eval rows, writes `report/summary.{json,md}` and `report/reward.png`.
pub async fn write_report(store: &Store, layout: &RunLayout, run_id: &str, iterations: u32) -> Result<Summary> {
    let mut records = Vec::new();
    for t in 1..=iterations {
        let manifest = read_manifest(store, layout, t, ShardedPhase::Eval).await?;
        records.extend(read_accepted::<EvalRecord>(store, &manifest).await?);
    }
    let summary = Summary { run_id: run_id.to_owned(), rows: summarize(&records) };
    let dir = layout.report_dir();
    store.put_json(&format!("{dir}/summary.json"), &summary).await?;
    store.put(&format!("{dir}/summary.md"), markdown(&summary).into_bytes()).await?;
    store.put(&format!("{dir}/reward.png"), plot::reward_plot(&summary.rows)).await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, t: u32, prompt: &str, reward: f64, reference: Option<f64>) -> EvalRecord {
        EvalRecord {
            instruction: prompt.into(),
            output: "x".into(),
            generator: method.into(),
            dataset: None,
            prompt_id: prompt.into(),
            method: method.into(),
            iteration: t,
            reward: Some(reward),
            tokens: 4,
            length: 2,
            reference: None,
            reference_reward: reference,
            kl_bound: Some(0.5),
            seconds: 0.25,
        }
    }

    #[test]
    fn estimate_is_mean_and_standard_error() {
        let e = estimate(&[1.0, 2.0, 3.0, 4.0]);
        assert!((e.mean - 2.5).abs() < 1e-12);
        // sample sd = sqrt(5/3); se = sd / 2
        assert!((e.se - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(estimate(&[7.0]).se, 0.0);
    }

    #[test]
    fn win_rates_pair_answers_by_prompt_and_count_ties_half() {
        let rows = vec![
            row("base", 1, "a", 0.0, Some(1.0)),
            row("base", 1, "b", 2.0, Some(1.0)),
            row("iro", 1, "a", 1.0, Some(1.0)),
            row("iro", 1, "b", 3.0, Some(1.0)),
            row("iro", 2, "a", -1.0, Some(1.0)),
            row("iro", 2, "b", 2.0, Some(1.0)),
        ];
        let s = summarize(&rows);
        let labels: Vec<String> = s.iter().map(SummaryRow::label).collect();
        assert_eq!(labels, ["base", "iro iter 1", "iro iter 2"]);
        assert_eq!(s[0].win_rate_vs_base, None);
        assert_eq!(s[0].win_rate_vs_reference.unwrap().mean, 0.5);
        assert_eq!(s[1].win_rate_vs_base.unwrap().mean, 1.0);
        // Iteration 2: a loses to base (−1 < 0), b ties (2 = 2).
        assert_eq!(s[2].win_rate_vs_base.unwrap().mean, 0.25);
        // vs reference: a tie (1 = 1) and a win.
        assert_eq!(s[1].win_rate_vs_reference.unwrap().mean, 0.75);
        assert_eq!((s[1].tokens, s[1].seconds, s[1].mean_length), (8, 0.5, 2.0));
        let md = markdown(&Summary { run_id: "r".into(), rows: s });
        assert!(md.contains("| iro iter 2 | 2 |"), "{md}");
    }

    #[test]
    fn a_reward_without_reference_scores_has_no_reference_win_rate() {
        let s = summarize(&[row("iro", 1, "a", 0.3, None)]);
        assert_eq!(s[0].win_rate_vs_reference, None);
        assert!(markdown(&Summary { run_id: "r".into(), rows: s }).contains("n/a"));
    }
}
