//! The results of a run: per method (and IRO iteration), the mean evaluation reward with its standard error,
//! win rates against the reference and against the base policy on the same prompts, response length, the KL
//! bound to the base policy, tokens sampled and wall time. Written as `report/summary.json`,
//! `report/summary.md` and `report/reward.png`, computed from the accepted eval shards only.

mod plot;
mod png;

pub use plot::{Series, efficiency_plot};

use std::collections::HashMap;

use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{EvalRecord, ValueDiagnostics, ValueTraining, read_accepted, read_manifest};
use iro_common::store::Store;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::pipeline::train::TRAINING_FILE;

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
    /// Paired reward difference to the base policy's answer to the same prompt (same seeds).
    #[serde(default)]
    pub diff_vs_base: Option<Estimate>,
    /// Paired reward difference to Best-of-N's answer to the same prompt.
    #[serde(default)]
    pub diff_vs_best_of_n: Option<Estimate>,
}

/// How well V_t ranked held-out candidates (each test prompt's Best-of-N samples), and how its training went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueRow {
    pub iteration: u32,
    pub prompts: usize,
    pub candidates_per_prompt: usize,
    pub training: Option<ValueTraining>,
    /// Within-prompt pairwise concordance with the reward (per-prompt share of pairs ordered alike, ties in V
    /// half; chance 0.5), V_t alone on complete candidates.
    pub concordance: Estimate,
    /// The same, for the guiding sum Σ V_i/β_i.
    pub guide_concordance: Estimate,
    /// The same, for V_t on the first `prefix_tokens` tokens (what CBS's first selection compares).
    pub prefix_concordance: Estimate,
    pub prefix_tokens: u32,
    /// Share of prompts where argmax V_t = argmax r (chance 1/N).
    pub argmax_agreement: Estimate,
    pub mean_value: f64,
    pub mean_reward: f64,
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
    #[serde(default)]
    pub values: Vec<ValueRow>,
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
    let by_prompt = |method: &str| -> HashMap<&str, f64> {
        records
            .iter()
            .filter(|r| r.method == method)
            .filter_map(|r| r.reward.map(|x| (r.prompt_id.as_str(), x)))
            .collect()
    };
    let base = by_prompt("base");
    let bon = by_prompt("best_of_n");
    let paired = |rows: &[&EvalRecord], other: &HashMap<&str, f64>| -> Option<Estimate> {
        let d: Vec<f64> = rows.iter().filter_map(|r| Some(r.reward? - other.get(r.prompt_id.as_str())?)).collect();
        (!d.is_empty()).then(|| estimate(&d))
    };
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
                diff_vs_base: if method == "base" { None } else { paired(&rows, &base) },
                diff_vs_best_of_n: if method == "best_of_n" { None } else { paired(&rows, &bon) },
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

/// Per-prompt share of candidate pairs with different rewards that `v` orders as `r` does (ties in `v` half);
/// `None` when every candidate has the same reward.
pub(crate) fn concordance(v: &[f64], r: &[f64]) -> Option<f64> {
    let (mut agree, mut pairs) = (0.0, 0usize);
    for a in 0..r.len().min(v.len()) {
        for b in a + 1..r.len().min(v.len()) {
            if r[a] == r[b] {
                continue;
            }
            pairs += 1;
            let s = (v[a] - v[b]) * (r[a] - r[b]);
            agree += if s > 0.0 {
                1.0
            } else if s == 0.0 {
                0.5
            } else {
                0.0
            };
        }
    }
    (pairs > 0).then(|| agree / pairs as f64)
}

/// The value-function table: one row per iteration whose IRO rows carry diagnostics.
pub fn summarize_values(records: &[EvalRecord], training: &HashMap<u32, ValueTraining>) -> Vec<ValueRow> {
    let mut by_t: Vec<(u32, Vec<&ValueDiagnostics>)> = Vec::new();
    for r in records.iter().filter(|r| r.method == "iro") {
        let Some(d) = &r.diagnostics else { continue };
        match by_t.iter_mut().find(|(t, _)| *t == r.iteration) {
            Some((_, ds)) => ds.push(d),
            None => by_t.push((r.iteration, vec![d])),
        }
    }
    by_t.sort_by_key(|(t, _)| *t);
    by_t.into_iter()
        .map(|(t, ds)| {
            let conc = |pick: fn(&ValueDiagnostics) -> &[f64]| {
                estimate(&ds.iter().filter_map(|d| concordance(pick(d), &d.rewards)).collect::<Vec<_>>())
            };
            let argmax = ds
                .iter()
                .filter(|d| !d.rewards.is_empty())
                .map(|d| f64::from(crate::search::argmax(&d.value) == crate::search::argmax(&d.rewards)))
                .collect::<Vec<_>>();
            let all = |pick: fn(&ValueDiagnostics) -> &[f64]| {
                let xs: Vec<f64> = ds.iter().flat_map(|d| pick(d).iter().copied()).collect();
                xs.iter().sum::<f64>() / xs.len().max(1) as f64
            };
            ValueRow {
                iteration: t,
                prompts: ds.len(),
                candidates_per_prompt: ds.iter().map(|d| d.rewards.len()).max().unwrap_or(0),
                training: training.get(&t).cloned(),
                concordance: conc(|d| &d.value),
                guide_concordance: conc(|d| &d.guide),
                prefix_concordance: conc(|d| &d.value_prefix),
                prefix_tokens: ds.first().map_or(0, |d| d.prefix_tokens),
                argmax_agreement: estimate(&argmax),
                mean_value: all(|d| &d.value),
                mean_reward: all(|d| &d.rewards),
            }
        })
        .collect()
}

fn signed(e: &Option<Estimate>) -> String {
    e.map_or("n/a".into(), |e| format!("{:+.4} ± {:.4}", e.mean, e.se))
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
    s.push_str("| method | prompts | reward | Δ vs base (paired) | Δ vs best-of-N (paired) | win % vs reference | win % vs base | mean length | KL bound (nats) | tokens sampled | seconds |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &summary.rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} ± {:.4} | {} | {} | {} | {} | {:.1} | {} | {} | {:.1} |\n",
            r.label(),
            r.prompts,
            r.reward.mean,
            r.reward.se,
            signed(&r.diff_vs_base),
            signed(&r.diff_vs_best_of_n),
            pct(&r.win_rate_vs_reference),
            pct(&r.win_rate_vs_base),
            r.mean_length,
            r.kl_bound.map_or("n/a".into(), |k| format!("{k:.2}")),
            r.tokens,
            r.seconds
        ));
    }
    s.push_str(
        "\nKL bounds are relative to the warped sampler (temperature, top-k, top-p), not the raw model; Δ columns \
         pair each prompt's answer with the other method's answer to the same prompt (same seeds), mean ± s.e.\n",
    );
    if !summary.values.is_empty() {
        s.push_str(
            "\n## Value functions\n\nOn each test prompt's Best-of-N candidates: within-prompt pairwise concordance with \
             the training reward (%, chance 50), V_t alone on complete answers, the guiding sum Σ V_i/β_i, and V_t on \
             the first chunk; argmax agreement (%, chance 100/N); training loss against the best constant's.\n\n",
        );
        s.push_str("| V | prompts × candidates | concordance % | guide concordance % | first-chunk concordance % | argmax = reward argmax % | mean V / mean r | train loss (first → last) | constant loss | examples, steps |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for v in &summary.values {
            let (loss, constant, size) = match &v.training {
                // A ridge head has no steps: its fit's loss, beside the loss on prompts held out of the fit.
                Some(t) if t.ridge_alpha.is_some() => (
                    format!(
                        "ridge {:.4} (held-out prompts {:.4}, α {})",
                        t.final_loss,
                        t.cv_loss.unwrap_or(f64::NAN),
                        t.ridge_alpha.unwrap_or(f64::NAN)
                    ),
                    format!("{:.4}", t.constant_loss),
                    format!("{}, closed form", t.examples),
                ),
                Some(t) => (
                    format!("{:.4} → {:.4}", t.first_loss, t.final_loss),
                    format!("{:.4}", t.constant_loss),
                    format!("{}, {}", t.examples, t.steps),
                ),
                None => ("n/a".into(), "n/a".into(), "n/a".into()),
            };
            s.push_str(&format!(
                "| V_{} | {} × {} | {} | {} | {} ({} tok) | {} | {:.3} / {:.3} | {loss} | {constant} | {size} |\n",
                v.iteration,
                v.prompts,
                v.candidates_per_prompt,
                pct(&Some(v.concordance)),
                pct(&Some(v.guide_concordance)),
                pct(&Some(v.prefix_concordance)),
                v.prefix_tokens,
                pct(&Some(v.argmax_agreement)),
                v.mean_value,
                v.mean_reward,
            ));
        }
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
    let mut training = HashMap::new();
    for t in 1..=iterations {
        // The accepted attempt's summary only: a late attempt's never reaches the report.
        let Some(accepted) = iro_common::values::read_value_manifest(store, layout, t).await? else { continue };
        let key = format!("{}/{TRAINING_FILE}", accepted.model_key());
        if let Some(bytes) = store.get_if_exists(&key).await? {
            match serde_json::from_slice::<ValueTraining>(&bytes) {
                Ok(v) => {
                    training.insert(t, v);
                }
                Err(e) => tracing::warn!(key, error = %e, "unreadable value training summary; left out of the report"),
            }
        }
    }
    let summary =
        Summary { run_id: run_id.to_owned(), rows: summarize(&records), values: summarize_values(&records, &training) };
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
            diagnostics: None,
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
        let md = markdown(&Summary { run_id: "r".into(), rows: s, values: Vec::new() });
        assert!(md.contains("| iro iter 2 | 2 |"), "{md}");
    }

    #[test]
    fn paired_differences_match_prompts_and_take_the_standard_error_of_the_differences() {
        let rows = vec![
            row("base", 1, "a", 0.5, None),
            row("base", 1, "b", 0.1, None),
            row("best_of_n", 1, "a", 0.7, None),
            row("best_of_n", 1, "b", 0.2, None),
            row("iro", 1, "b", 0.4, None),
            row("iro", 1, "a", 0.7, None),
        ];
        let s = summarize(&rows);
        let iro = s.iter().find(|r| r.method == "iro").unwrap();
        // a: 0.7 − 0.5, b: 0.4 − 0.1 → mean 0.25, sd of (0.2, 0.3) / √2 = 0.05
        let d = iro.diff_vs_base.unwrap();
        assert!((d.mean - 0.25).abs() < 1e-12 && (d.se - 0.05).abs() < 1e-12, "{d:?}");
        let d = iro.diff_vs_best_of_n.unwrap();
        assert!((d.mean - 0.1).abs() < 1e-12, "{d:?}");
        assert_eq!(s[0].diff_vs_base, None);
        assert_eq!(s[1].diff_vs_best_of_n, None);
    }

    #[test]
    fn concordance_counts_pairs_ordered_like_the_reward() {
        // Pairs (0,1) agree, (0,2) disagree, (1,2) tie in V: (1 + 0 + ½) / 3.
        assert!((concordance(&[0.5, 1.0, 1.0], &[0.3, 0.5, 0.2]).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(concordance(&[1.0, 2.0, 3.0], &[0.1, 0.2, 0.3]), Some(1.0));
        assert_eq!(concordance(&[3.0, 2.0, 1.0], &[0.1, 0.2, 0.3]), Some(0.0));
        // Equal rewards give no pair.
        assert_eq!(concordance(&[1.0, 2.0], &[0.3, 0.3]), None);
        let mut with = row("iro", 2, "a", 0.3, None);
        with.diagnostics = Some(ValueDiagnostics {
            rewards: vec![0.1, 0.5, 0.2],
            value: vec![1.0, 3.0, 2.0],
            guide: vec![3.0, 1.0, 2.0],
            prefix_tokens: 8,
            value_prefix: vec![1.0, 1.0, 0.0],
            guide_prefix: vec![0.0, 0.0, 0.0],
        });
        let v = summarize_values(&[with], &HashMap::new());
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].iteration, v[0].prompts, v[0].candidates_per_prompt), (2, 1, 3));
        assert_eq!(v[0].concordance.mean, 1.0);
        assert_eq!(v[0].guide_concordance.mean, 0.0);
        assert!((v[0].prefix_concordance.mean - 0.5).abs() < 1e-12);
        assert_eq!(v[0].argmax_agreement.mean, 1.0);
        assert!((v[0].mean_value - 2.0).abs() < 1e-12);
    }

    #[test]
    fn a_reward_without_reference_scores_has_no_reference_win_rate() {
        let s = summarize(&[row("iro", 1, "a", 0.3, None)]);
        assert_eq!(s[0].win_rate_vs_reference, None);
        assert!(markdown(&Summary { run_id: "r".into(), rows: s, values: Vec::new() }).contains("n/a"));
    }
}
