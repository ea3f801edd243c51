//! The value-learning benchmark (`iro bench value`): which `[value]` settings give a V_1 that ranks held-out
//! candidates the way the reward does. It samples iteration 1's training data once (each training prompt's
//! plain samples, seeded as the run's first rollout seeds them, every sample an example), draws the held-out
//! candidates once (the first test prompts' Best-of-N candidates, as the report's diagnostics), computes the
//! frozen backbone's states of both once, and then trains one `head` per point of the grid on those states —
//! so a grid of dozens of trainings costs about one rollout. Each row reports the fit (final loss against the
//! constant predictor's) and the held-out ranking: within-prompt pairwise concordance of V with the reward on
//! complete candidates and after the first chunk, and how often argmax V is argmax r.
//!
//! Subsets are prefixes: `train_prompts = 24` is the first 24 of the sampled prompts, `samples = 2` the first two
//! samples of each, so rows differ only by the knob that changed.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::Pipeline;
use super::data::{PromptItem, phase_seed, prompt_items};
use super::report::{Estimate, concordance, estimate};
use super::scoring::TextRewardScorer;
use super::train::centre_per_prompt;
use crate::error::{Error, Result};
use crate::model::heads::{Head, MlpHead, ScalarHead};
use crate::search::{Candidate, argmax, best_of_n};
use crate::train::ridge::{Centring, fit_ridge};
use crate::train::{
    FeatureCache, ValueExample, ValueInit, ValueTrainConfig, constant_predictor_loss, train_value_sharing_features,
};
use iro_common::config::{HeadFit, ValuePooling, ValueTargets};

/// The grid. Every list must be non-empty.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueBenchSpec {
    /// Training prompts (prefixes of iteration 1's rollout prompts; the largest is sampled).
    pub train_prompts: Vec<usize>,
    /// Plain samples per training prompt (prefixes; the largest is sampled).
    pub samples: Vec<usize>,
    /// The first this many test prompts hold the held-out candidates (`baselines.best_of_n` each).
    pub test_prompts: usize,
    pub epochs: Vec<usize>,
    pub lrs: Vec<f64>,
    pub weight_decays: Vec<f64>,
    pub widths: Vec<usize>,
    pub targets: Vec<ValueTargets>,
    /// `adamw` rows vary every knob above; a `ridge` row only the data and targets (it has no epochs, lr, decay
    /// or width: its shrinkage is chosen by cross-validation, `value.ridge_folds` folds).
    pub fits: Vec<HeadFit>,
    /// Feature depths: the states after this many decoder layers (then the final norm); 0 means every layer (the
    /// states a shipped `head` reads). The outermost loop: each depth runs the backbone once more.
    pub layers: Vec<usize>,
    /// What of the states a head reads for a prefix (`value.pooling`); outermost with the depth.
    pub pooling: Vec<ValuePooling>,
}

/// One trained V and how it ranks the held-out candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueBenchRow {
    pub train_prompts: usize,
    pub samples: usize,
    pub examples: usize,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub width: usize,
    pub targets: ValueTargets,
    pub fit: HeadFit,
    /// Decoder layers the features passed through (0: all).
    pub layers: usize,
    #[serde(default)]
    pub pooling: ValuePooling,
    /// The ridge fit's chosen shrinkage (a multiple of the row count); absent for `adamw`.
    pub alpha: Option<f64>,
    pub steps: usize,
    pub final_loss: f64,
    pub constant_loss: f64,
    /// Per held-out prompt, the share of its candidate pairs ordered as the reward orders them (chance 50 %).
    pub concordance: Estimate,
    /// The same, each candidate cut after `prefix_tokens` tokens.
    pub prefix_concordance: Estimate,
    pub prefix_tokens: usize,
    /// Per held-out prompt, 1 when V's best candidate is the reward's.
    pub argmax_agreement: Estimate,
    pub seconds: f64,
}

/// One point of the grid.
struct Point {
    layers: usize,
    pooling: ValuePooling,
    prompts: usize,
    samples: usize,
    targets: ValueTargets,
    fit: HeadFit,
    epochs: usize,
    lr: f64,
    weight_decay: f64,
    width: usize,
}

/// Every combination of the spec's lists, the data knobs outermost.
fn grid(spec: &ValueBenchSpec) -> Vec<Point> {
    let mut points = Vec::new();
    for (&layers, &pooling) in spec.layers.iter().flat_map(|l| spec.pooling.iter().map(move |p| (l, p))) {
        for &prompts in &spec.train_prompts {
            for &samples in &spec.samples {
                for &targets in &spec.targets {
                    if spec.fits.contains(&HeadFit::Ridge) {
                        let fit = HeadFit::Ridge;
                        let (epochs, lr, weight_decay, width) = (0, 0.0, 0.0, 0);
                        points.push(Point {
                            layers,
                            pooling,
                            prompts,
                            samples,
                            targets,
                            fit,
                            epochs,
                            lr,
                            weight_decay,
                            width,
                        });
                    }
                    if !spec.fits.contains(&HeadFit::Adamw) {
                        continue;
                    }
                    for &epochs in &spec.epochs {
                        for &lr in &spec.lrs {
                            for &weight_decay in &spec.weight_decays {
                                for &width in &spec.widths {
                                    let fit = HeadFit::Adamw;
                                    let p = Point {
                                        layers,
                                        pooling,
                                        prompts,
                                        samples,
                                        targets,
                                        fit,
                                        epochs,
                                        lr,
                                        weight_decay,
                                        width,
                                    };
                                    points.push(p);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    points
}

/// A held-out prompt's candidates: their rewards and, per candidate, the rows of its [targets, H] states that V
/// reads for the complete candidate and for its first chunk.
struct HeldOut {
    rewards: Vec<f64>,
    full: Tensor,
    prefix: Tensor,
}

impl Pipeline {
    /// Runs the grid; `progress(done, total)` after each training.
    pub fn value_bench(
        &self,
        spec: &ValueBenchSpec,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<ValueBenchRow>> {
        let lists = [
            spec.train_prompts.len(),
            spec.samples.len(),
            spec.epochs.len(),
            spec.lrs.len(),
            spec.weight_decays.len(),
            spec.widths.len(),
            spec.targets.len(),
            spec.fits.len(),
            spec.layers.len(),
            spec.pooling.len(),
        ];
        if lists.contains(&0) || spec.test_prompts == 0 {
            return Err(Error::InvalidRequest(
                "bench value: every list of the grid and the test prompts need ≥ 1".into(),
            ));
        }
        let max_prompts = *spec.train_prompts.iter().max().unwrap_or(&0);
        let max_samples = *spec.samples.iter().max().unwrap_or(&0);
        if max_prompts == 0 || max_samples == 0 || spec.epochs.contains(&0) {
            return Err(Error::InvalidRequest("bench value: train prompts, samples and epochs must be ≥ 1".into()));
        }
        // Training data: iteration 1's rollout prompts (as many as asked) with their plain samples.
        let mut c = self.config.clone();
        c.data.prompts_per_iteration = max_prompts;
        let indices = self.data.rollout_prompts(&c, 1)?;
        let items = prompt_items(
            &self.data.train,
            &indices,
            c.policy.prompt_format,
            c.policy.max_prompt_tokens,
            &self.tokenizer,
            phase_seed(c.run.seed, Some(1)),
        )?;
        let start = std::time::Instant::now();
        let train = self.sampled_candidates(&items, max_samples)?;
        tracing::info!(
            prompts = items.len(),
            samples = max_samples,
            seconds = start.elapsed().as_secs_f64(),
            "bench value: training candidates sampled"
        );
        // Every sample is an example, tagged (prompt, sample) so each grid row takes its subset by filtering.
        let mut examples: Vec<(usize, usize, ValueExample)> = Vec::new();
        for (p, (item, cs)) in items.iter().zip(&train).enumerate() {
            for (s, cand) in cs.iter().enumerate() {
                let example = ValueExample {
                    prompt: item.ids.clone(),
                    response: cand.generation.tokens.clone(),
                    reward: cand.score,
                };
                examples.push((p, s, example));
            }
        }
        let start = std::time::Instant::now();
        let (test_items, test_candidates) = self.held_out_candidates(spec.test_prompts)?;
        tracing::info!(
            prompts = test_items.len(),
            seconds = start.elapsed().as_secs_f64(),
            "bench value: held-out candidates drawn"
        );
        let prefix_tokens = self.config.search.chunk_length.min(self.config.sampling.max_new_tokens);

        let points = grid(spec);
        let depth_layers = self.policy.config.num_layers();
        if let Some(&l) = spec.layers.iter().find(|&&l| l > depth_layers) {
            return Err(Error::InvalidRequest(format!("bench value: --layers {l}, but the policy has {depth_layers}")));
        }
        // Per feature depth, the backbone's states of every example and of the held-out candidates, once; each grid
        // row trains on a re-indexed view of them. Points come depth by depth, so one depth's states are held.
        let mut states: Option<((usize, ValuePooling), FeatureCache, Vec<HeldOut>)> = None;
        let mut rows = Vec::with_capacity(points.len());
        // Each training's checkpoint lives here only until its head is loaded.
        let scratch = self.work_dir.join("bench-value");
        for (done, p) in points.iter().enumerate() {
            if states.as_ref().is_none_or(|(at, _, _)| *at != (p.layers, p.pooling)) {
                drop(states.take());
                let depth = (p.layers > 0).then_some(p.layers);
                let mut features = FeatureCache::pooled(depth, p.pooling);
                let keyed: Vec<(usize, &ValueExample)> =
                    examples.iter().enumerate().map(|(i, (_, _, e))| (i, e)).collect();
                for chunk in keyed.chunks(self.config.sampling.batch_size.max(1)) {
                    let _ = features.micro_batch(&self.policy.backbone, chunk, self.pad, self.device)?;
                }
                let held_out = self.held_out_states(&test_items, &test_candidates, depth, p.pooling)?;
                tracing::info!(
                    examples = examples.len(),
                    layers = p.layers,
                    points = points.len(),
                    "bench value: backbone states ready; training the grid"
                );
                states = Some(((p.layers, p.pooling), features, held_out));
            }
            let Some((_, features, held_out)) = states.as_mut() else { unreachable!("filled above") };
            let held_out = &*held_out;
            let start = std::time::Instant::now();
            let keep: Vec<usize> =
                (0..examples.len()).filter(|&i| examples[i].0 < p.prompts && examples[i].1 < p.samples).collect();
            let mut subset: Vec<ValueExample> = keep.iter().map(|&i| examples[i].2.clone()).collect();
            if p.targets == ValueTargets::PromptCentred {
                centre_per_prompt(&mut subset);
            }
            let (head, steps, final_loss, alpha) = match p.fit {
                HeadFit::Ridge => {
                    let mut view = features.select(&keep);
                    let batch = self.config.sampling.batch_size;
                    let (states, targets, groups) =
                        view.all_rows(&self.policy.backbone, &subset, self.pad, self.device, batch)?;
                    let centring = match p.targets {
                        ValueTargets::Reward => Centring::Pooled,
                        ValueTargets::PromptCentred => Centring::WithinPrompt,
                    };
                    let fit = fit_ridge(&states, &targets, &groups, centring, None, self.config.value.ridge_folds)?;
                    let head = ScalarHead {
                        weight: fit.weight.to_device(self.device),
                        bias: Some(fit.bias.to_device(self.device)),
                        offset: 0.0,
                    };
                    (Head::Linear(head), 1, fit.train_loss, Some(fit.alpha))
                }
                HeadFit::Adamw => {
                    let mut section = self.config.value.clone();
                    section.epochs = p.epochs;
                    section.lr = p.lr;
                    section.weight_decay = p.weight_decay;
                    section.checkpoint_every = 0;
                    let cfg = ValueTrainConfig::new(&section, self.config.run.seed ^ 1, self.pad);
                    let init = ValueInit::Head {
                        backbone: self.policy.backbone.clone(),
                        hidden: self.policy.config.hidden_size() * p.pooling.blocks(),
                        width: p.width as i64,
                        from: None,
                        depth: (p.layers > 0).then_some(p.layers),
                    };
                    let out = scratch.join(format!("v{done}"));
                    let report = train_value_sharing_features(&cfg, &subset, &init, &out, &mut features.select(&keep))?;
                    let head = MlpHead::load(&report.checkpoint, self.device)?;
                    let _ = std::fs::remove_dir_all(&out);
                    (Head::Mlp(head), report.steps, report.final_loss, None)
                }
            };
            let (concordance, prefix_concordance, argmax_agreement) = rank_held_out(&head, held_out);
            rows.push(ValueBenchRow {
                train_prompts: p.prompts.min(items.len()),
                samples: p.samples,
                examples: subset.len(),
                epochs: p.epochs,
                lr: p.lr,
                weight_decay: p.weight_decay,
                width: p.width,
                targets: p.targets,
                fit: p.fit,
                layers: p.layers,
                pooling: p.pooling,
                alpha,
                steps,
                final_loss,
                constant_loss: constant_predictor_loss(&subset),
                concordance,
                prefix_concordance,
                prefix_tokens,
                argmax_agreement,
                seconds: start.elapsed().as_secs_f64(),
            });
            progress(done + 1, points.len());
        }
        Ok(rows)
    }

    /// `n` plain samples per item, each with its training reward, seeded as Best-of-N (and the first rollout).
    fn sampled_candidates(&self, items: &[PromptItem], n: usize) -> Result<Vec<Vec<Candidate>>> {
        let mut out = Vec::with_capacity(items.len());
        for batch in items.chunks((self.config.sampling.batch_size / n).max(1)) {
            let prompts: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.clone()).collect();
            let seeds: Vec<u64> = batch.iter().map(|p| p.seed).collect();
            let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
            for found in best_of_n(&self.policy, &prompts, &seeds, n, &self.generate_options(), &mut reward)? {
                out.push(found.candidates);
            }
        }
        Ok(out)
    }

    /// The first `n` test prompts and their Best-of-N candidates.
    fn held_out_candidates(&self, n: usize) -> Result<(Vec<PromptItem>, Vec<Vec<Candidate>>)> {
        let picked: Vec<usize> = self.data.test_prompts().iter().copied().take(n).collect();
        let items = self.test_items(&picked)?;
        let candidates = self.sampled_candidates(&items, self.config.baselines.best_of_n)?;
        Ok((items, candidates))
    }

    /// The held-out candidates with the states V reads on them (after `depth` layers): as the guiding scorer feeds
    /// them, a finished candidate with EOS (the policy's tokens already end in it), a cut one as it stands.
    fn held_out_states(
        &self,
        items: &[PromptItem],
        candidates: &[Vec<Candidate>],
        depth: Option<usize>,
        pooling: ValuePooling,
    ) -> Result<Vec<HeldOut>> {
        let prefix = self.config.search.chunk_length.min(self.config.sampling.max_new_tokens);
        let mut cache = FeatureCache::pooled(depth, pooling);
        let mut out = Vec::with_capacity(items.len());
        for (p, (item, cs)) in items.iter().zip(candidates).enumerate() {
            let examples: Vec<ValueExample> = cs
                .iter()
                .map(|c| {
                    let mut response = c.generation.tokens.clone();
                    if c.generation.stopped_at_eos && !response.last().is_some_and(|t| self.eos.contains(t)) {
                        response.push(self.eos[0]);
                    }
                    ValueExample { prompt: item.ids.clone(), response, reward: c.score }
                })
                .collect();
            let keyed: Vec<(usize, &ValueExample)> =
                examples.iter().enumerate().map(|(j, e)| (p * cs.len() + j, e)).collect();
            let (states, _) = cache.micro_batch(&self.policy.backbone, &keyed, self.pad, self.device)?;
            // Row 0 of an example's states is the empty response (the last prompt token), row k after k tokens.
            let (mut full, mut cut, mut at) = (Vec::new(), Vec::new(), 0i64);
            for (c, e) in cs.iter().zip(&examples) {
                let last = e.targets() as i64 - 1;
                full.push(at + last);
                // The first chunk of a candidate that ended inside it is the finished candidate itself.
                let fits = c.generation.stopped_at_eos && c.generation.tokens.len() <= prefix;
                cut.push(at + if fits { last } else { prefix.min(c.generation.tokens.len()) as i64 });
                at += e.targets() as i64;
            }
            let pick = |rows: Vec<i64>| states.index_select(0, &Tensor::from_slice(&rows).to_device(self.device));
            out.push(HeldOut { rewards: cs.iter().map(|c| c.score).collect(), full: pick(full), prefix: pick(cut) });
        }
        Ok(out)
    }
}

/// Concordance on complete candidates, after the first chunk, and argmax agreement, over the held-out prompts.
fn rank_held_out(head: &Head, held_out: &[HeldOut]) -> (Estimate, Estimate, Estimate) {
    let values = |states: &Tensor| -> Vec<f64> {
        tch::no_grad(|| Vec::<f64>::try_from(head.forward(states).to_kind(tch::Kind::Double)).unwrap_or_default())
    };
    let (mut conc, mut prefix, mut agree) = (Vec::new(), Vec::new(), Vec::new());
    for h in held_out {
        let (v, vp) = (values(&h.full), values(&h.prefix));
        conc.extend(concordance(&v, &h.rewards));
        prefix.extend(concordance(&vp, &h.rewards));
        if !h.rewards.is_empty() {
            agree.push(f64::from(argmax(&v) == argmax(&h.rewards)));
        }
    }
    (estimate(&conc), estimate(&prefix), estimate(&agree))
}

/// The rows as pretty JSON.
pub fn value_bench_json(rows: &[ValueBenchRow]) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(rows).map_err(|e| Error::InvalidRequest(format!("cannot encode the benchmark rows: {e}")))
}

/// The rows as a Markdown table.
pub fn value_bench_markdown(rows: &[ValueBenchRow]) -> String {
    let mut s = String::from(
        "| layers | pooling | prompts | samples | examples | targets | fit | epochs | lr | wd | width | loss / constant | concordance | \
         first-chunk concordance | argmax = argmax r |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let pct = |e: &Estimate| format!("{:.1} ± {:.1} %", 100.0 * e.mean, 100.0 * e.se);
    for r in rows {
        // A ridge row has no epochs, lr, decay or width; it shows the shrinkage cross-validation chose.
        let (fit, epochs, lr, wd, width) = match (r.fit, r.alpha) {
            (HeadFit::Ridge, alpha) => {
                (format!("ridge (α {})", alpha.unwrap_or(f64::NAN)), "—".into(), "—".into(), "—".into(), "—".into())
            }
            (HeadFit::Adamw, _) => (
                "adamw".to_owned(),
                r.epochs.to_string(),
                r.lr.to_string(),
                r.weight_decay.to_string(),
                r.width.to_string(),
            ),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {fit} | {epochs} | {lr} | {wd} | {width} | {:.5} / {:.5} | {} | {} (L = {}) | {} |\n",
            if r.layers == 0 { "all".to_owned() } else { r.layers.to_string() },
            r.pooling.as_str(),
            r.train_prompts,
            r.samples,
            r.examples,
            match r.targets {
                ValueTargets::Reward => "reward",
                ValueTargets::PromptCentred => "prompt_centred",
            },
            r.final_loss,
            r.constant_loss,
            pct(&r.concordance),
            pct(&r.prefix_concordance),
            r.prefix_tokens,
            pct(&r.argmax_agreement),
        ));
    }
    s
}
