//! Guided decoding on the tiny fixtures: CBS end to end, CBS(W = 1, K = N, L = ∞) = Best-of-N, the
//! cached value scorer = re-encoding, and ARGS with w = 0 = greedy decoding (iro.md, "Guided decoding"
//! and "Baselines").

use std::path::{Path, PathBuf};

use iro_common::config::{ArgsWeightUnit, ValuePooling};
use iro_worker::Result;
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::generate::{Decoder, GenerateOptions, generate, left_pad};
use iro_worker::model::heads::{Head, MlpHead};
use iro_worker::model::{CausalLm, ScalarModel, positions_from_valid};
use iro_worker::search::{
    ArgsParams, CachedValueEnsemble, CbsParams, FinalPick, PolicyHeadEnsemble, PrefixScorer, ValueEnsemble,
    args_decode, best_of_n, chunk_beam_search, pick_final,
};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn policy() -> CausalLm {
    CausalLm::load(&fixture("llama_gqa_tied"), Kind::Float, Device::Cpu).unwrap()
}

fn scalar(name: &str) -> ScalarModel {
    ScalarModel::load(&fixture(name), Kind::Float, Device::Cpu).unwrap()
}

fn prompts() -> Vec<Vec<i64>> {
    vec![vec![5, 17, 42, 99, 100, 7, 8], vec![300, 301, 9, 12]]
}

/// 68 is the fixture's own EOS; the others make some sampled rows stop early, so finished rows (scored
/// with EOS appended) and cut-off rows both occur.
const EOS: [i64; 4] = [68, 2, 401, 37];
const SAMPLING: SamplingParams = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };

fn cbs_params(beams: usize, successors: usize, chunk_len: usize, max_new_tokens: usize) -> CbsParams {
    CbsParams {
        beams,
        successors,
        chunk_len,
        sampling: SAMPLING,
        max_new_tokens,
        eos_token_ids: EOS.to_vec(),
        pad_token_id: 3,
    }
}

/// Scores with both scorers, checks they agree, and returns the cached one's scores.
struct Both<'m> {
    plain: ValueEnsemble<'m>,
    cached: CachedValueEnsemble<'m>,
    calls: usize,
}

impl PrefixScorer for Both<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        let a = self.plain.score(prompts, responses, finished)?;
        let b = self.cached.score(prompts, responses, finished)?;
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!((a - b).abs() <= 1e-4, "call {}: row {i}: re-encoded {a} vs cached {b}", self.calls);
        }
        self.calls += 1;
        Ok(b)
    }

    fn reorder(&mut self, index: &[i64]) {
        self.cached.reorder(index);
    }

    fn reset(&mut self) {
        self.cached.reset();
    }
}

#[test]
fn cbs_w2_k2_l3_returns_w_times_k_rows_per_prompt_within_max_new_tokens() {
    let lm = policy();
    let (v1, v2, rm) = (scalar("llama_seqcls"), scalar("neox_seqcls"), scalar("neox_seqcls"));
    let mut values = ValueEnsemble::new(vec![(&v1, 1.0), (&v2, 2.0)], EOS.to_vec()).unwrap();
    let params = cbs_params(2, 2, 3, 8);
    let out = chunk_beam_search(&lm, &prompts(), &[11, 12], &params, &mut values).unwrap().candidates;
    assert_eq!(out.len(), 2);
    for group in &out {
        assert_eq!(group.len(), 4);
        for c in group {
            assert!(!c.generation.tokens.is_empty() && c.generation.tokens.len() <= 8);
            assert!(c.score.is_finite());
        }
    }
    // The returned scores are the ensemble's scores of the returned rows.
    for (p, group) in prompts().iter().zip(&out) {
        let responses: Vec<Vec<i64>> = group.iter().map(|c| c.generation.tokens.clone()).collect();
        let finished = vec![true; responses.len()];
        let again = values.score(&vec![p.clone(); responses.len()], &responses, &finished).unwrap();
        for (c, s) in group.iter().zip(again) {
            assert!((c.score - s).abs() < 1e-4);
        }
    }
    // Seeded: the same seeds reproduce the search.
    let rerun = chunk_beam_search(&lm, &prompts(), &[11, 12], &params, &mut values).unwrap().candidates;
    assert_eq!(out, rerun);
    // Final picks.
    assert_eq!(pick_final(&prompts(), &out, FinalPick::First, None).unwrap(), vec![0, 0]);
    let by_value = pick_final(&prompts(), &out, FinalPick::ValueArgmax, None).unwrap();
    for (g, &i) in out.iter().zip(&by_value) {
        assert!(g.iter().all(|c| c.score <= g[i].score));
    }
    assert!(pick_final(&prompts(), &out, FinalPick::RewardArgmax, None).is_err());
    let mut reward = ValueEnsemble::new(vec![(&rm, 1.0)], EOS.to_vec()).unwrap();
    let by_reward = pick_final(&prompts(), &out, FinalPick::RewardArgmax, Some(&mut reward)).unwrap();
    assert!(by_reward.iter().all(|&i| i < 4));
}

#[test]
fn cbs_with_one_beam_n_successors_and_unbounded_chunks_is_best_of_n() {
    let lm = policy();
    let rm = scalar("neox_seqcls");
    let mut reward = ValueEnsemble::new(vec![(&rm, 1.0)], EOS.to_vec()).unwrap();
    let n = 4;
    let seeds = [21, 22];
    let cbs =
        chunk_beam_search(&lm, &prompts(), &seeds, &cbs_params(1, n, usize::MAX, 10), &mut reward).unwrap().candidates;
    let opts = GenerateOptions { max_new_tokens: 10, sampling: SAMPLING, eos_token_ids: EOS.to_vec(), pad_token_id: 3 };
    let bon = best_of_n(&lm, &prompts(), &seeds, n, &opts, &mut reward).unwrap();
    for (c, b) in cbs.iter().zip(&bon) {
        let cg: Vec<_> = c.iter().map(|c| &c.generation).collect();
        let bg: Vec<_> = b.candidates.iter().map(|c| &c.generation).collect();
        assert_eq!(cg, bg);
        // Scored by the same model, so the reward argmax is the same row too.
        let best = c.iter().map(|c| c.score).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(b.candidates[b.best].score, best);
    }
    // The N samples really differ (replicas are forked, not copies).
    assert!(bon[0].candidates.iter().any(|c| c.generation != bon[0].candidates[0].generation));
}

#[test]
fn cached_value_scorer_equals_re_encoding_through_cbs_reorders() {
    let lm = policy();
    let (v1, v2) = (scalar("llama_seqcls"), scalar("neox_seqcls"));
    let members = || vec![(&v1, 1.0), (&v2, 2.5)];
    for headroom in [11, 2] {
        // headroom 2 < a chunk forces the cache to be rebuilt from scratch on the way.
        let mut both = Both {
            plain: ValueEnsemble::new(members(), EOS.to_vec()).unwrap(),
            cached: CachedValueEnsemble::new(members(), EOS.to_vec(), headroom).unwrap(),
            calls: 0,
        };
        let out =
            chunk_beam_search(&lm, &prompts(), &[31, 32], &cbs_params(2, 3, 3, 10), &mut both).unwrap().candidates;
        assert!(both.calls >= 3, "only {} chunks", both.calls);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![6, 6]);
        let prefills = both.cached.prefills();
        if headroom == 11 {
            assert_eq!(prefills, 1, "the cache should carry the whole search");
        } else {
            assert!(prefills > 1);
        }
        let rows: Vec<_> = out.iter().flatten().map(|c| c.generation.stopped_at_eos).collect();
        assert!(rows.contains(&true) && rows.contains(&false), "want both EOS-stopped and cut-off rows");
    }
    // Through ARGS's replicate-then-collapse too.
    let mut both = Both {
        plain: ValueEnsemble::new(members(), EOS.to_vec()).unwrap(),
        cached: CachedValueEnsemble::new(members(), EOS.to_vec(), 7).unwrap(),
        calls: 0,
    };
    let params = ArgsParams {
        top_k: 3,
        weight: 1.0,
        weight_unit: ArgsWeightUnit::Reward,
        max_new_tokens: 6,
        eos_token_ids: EOS.to_vec(),
        pad_token_id: 3,
    };
    let got = args_decode(&lm, &prompts(), &params, &mut both).unwrap();
    assert!(both.calls >= 1);
    assert_eq!(both.cached.prefills(), 1);
    assert_eq!(got.len(), 2);
}

#[test]
fn args_with_zero_reward_weight_is_greedy_decoding() {
    for name in ["llama_gqa_tied", "neox_parallel"] {
        let lm = CausalLm::load(&fixture(name), Kind::Float, Device::Cpu).unwrap();
        let rm = scalar("neox_seqcls");
        let mut reward = ValueEnsemble::new(vec![(&rm, 1.0)], EOS.to_vec()).unwrap();
        let params = ArgsParams {
            top_k: 4,
            weight: 0.0,
            weight_unit: ArgsWeightUnit::CandidateSd,
            max_new_tokens: 9,
            eos_token_ids: EOS.to_vec(),
            pad_token_id: 3,
        };
        let got = args_decode(&lm, &prompts(), &params, &mut reward).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 9,
            sampling: SamplingParams::GREEDY,
            eos_token_ids: EOS.to_vec(),
            pad_token_id: 3,
        };
        let greedy = generate(&lm, &prompts(), &[0, 0], &opts).unwrap();
        for (a, g) in got.iter().zip(&greedy) {
            assert_eq!(a.tokens, g.tokens, "{name}");
            assert_eq!(a.stopped_at_eos, g.stopped_at_eos, "{name}");
            for (x, y) in a.logprobs.iter().zip(&g.logprobs) {
                assert!((x - y).abs() < 1e-4, "{name}: logprob {x} vs {y}");
            }
        }
    }
}

#[test]
fn args_with_a_dominant_reward_picks_the_best_rewarded_of_the_top_k() {
    let lm = policy();
    // Reward: minus the last token id, weighted so it dominates the log-probability.
    let mut reward = |_: &[Vec<i64>], ys: &[Vec<i64>], _: &[bool]| -> Result<Vec<f64>> {
        Ok(ys.iter().map(|y| -(*y.last().unwrap_or(&0) as f64)).collect())
    };
    let params = ArgsParams {
        top_k: 5,
        weight: 1e6,
        weight_unit: ArgsWeightUnit::Reward,
        max_new_tokens: 1,
        eos_token_ids: vec![],
        pad_token_id: 3,
    };
    let got = args_decode(&lm, &prompts(), &params, &mut reward).unwrap();
    let _g = tch::no_grad_guard();
    for (p, g) in prompts().iter().zip(&got) {
        let ids = tch::Tensor::from_slice(p).unsqueeze(0);
        let valid = ids.ones_like().to_kind(Kind::Bool);
        let logits = lm.forward(&ids, &valid, &positions_from_valid(&valid), None).select(1, -1);
        let top: Vec<i64> = Vec::try_from(logits.topk(5, -1, true, true).1.reshape([-1])).unwrap();
        assert_eq!(g.tokens, vec![*top.iter().min().unwrap()]);
    }
}

/// A prompt's top-2 next tokens and their log-probabilities.
type Top2 = ([i64; 2], [f64; 2]);

/// The policy's top-2 next tokens and their log-probabilities after `prompt`.
fn top2(lm: &CausalLm, prompt: &[i64]) -> Top2 {
    let _g = tch::no_grad_guard();
    let ids = tch::Tensor::from_slice(prompt).unsqueeze(0);
    let valid = ids.ones_like().to_kind(Kind::Bool);
    let logits = lm.forward(&ids, &valid, &positions_from_valid(&valid), None).select(1, -1);
    let (lp, top) = logits.log_softmax(-1, Kind::Float).topk(2, -1, true, true);
    let lp: Vec<f32> = Vec::try_from(lp.reshape([-1])).unwrap();
    let top: Vec<i64> = Vec::try_from(top.reshape([-1])).unwrap();
    ([top[0], top[1]], [f64::from(lp[0]), f64::from(lp[1])])
}

#[test]
fn args_weight_in_candidate_sd_units_lets_a_small_reward_spread_change_the_pick() {
    let lm = policy();
    // z-scores of two different rewards are ±1, so w = 1 overturns a log-probability gap below 2: take the
    // first few-token prompts where the fixture's top-2 gap is that close (its logits are often far apart).
    let (prompts, tops): (Vec<Vec<i64>>, Vec<Top2>) = (4..400)
        .map(|i| vec![i, (i * 7) % 500 + 4, (i * 13) % 500 + 4])
        .map(|p| {
            let top = top2(&lm, &p);
            (p, top)
        })
        .filter(|(_, (_, lp))| lp[0] - lp[1] > 1e-3 && lp[0] - lp[1] < 1.9)
        .take(2)
        .unzip();
    assert_eq!(prompts.len(), 2, "no fixture prompt with a top-2 gap below 2");
    // A reward of small spread (a cosine-like 0.6 vs 0.6 + gap/2) that prefers each prompt's second token.
    let mut reward = |ps: &[Vec<i64>], ys: &[Vec<i64>], _: &[bool]| -> Result<Vec<f64>> {
        Ok(ps
            .iter()
            .zip(ys)
            .map(|(p, y)| {
                let (top, lp) = tops[prompts.iter().position(|q| q == p).unwrap()];
                let bonus = if y.last() == Some(&top[1]) { (lp[0] - lp[1]) / 2.0 } else { 0.0 };
                0.6 + bonus
            })
            .collect())
    };
    let params = |weight_unit| ArgsParams {
        top_k: 2,
        weight: 1.0,
        weight_unit,
        max_new_tokens: 1,
        eos_token_ids: vec![],
        pad_token_id: 3,
    };
    let raw = args_decode(&lm, &prompts, &params(ArgsWeightUnit::Reward), &mut reward).unwrap();
    let scaled = args_decode(&lm, &prompts, &params(ArgsWeightUnit::CandidateSd), &mut reward).unwrap();
    for ((top, _), (r, s)) in tops.iter().zip(raw.iter().zip(&scaled)) {
        assert_eq!(r.tokens, vec![top[0]], "raw w = 1: half the log-probability gap is not enough");
        assert_eq!(s.tokens, vec![top[1]], "w = 1 in candidate-sd units: the better-rewarded token wins");
    }
}

/// Head-kind values through a search: delegates to `PolicyHeadEnsemble` and fails the test if the search ever
/// asks it to run a forward pass of its own.
struct HiddenOnly<'m>(PolicyHeadEnsemble<'m>, usize);

impl PrefixScorer for HiddenOnly<'_> {
    fn score(&mut self, _: &[Vec<i64>], _: &[Vec<i64>], _: &[bool]) -> Result<Vec<f64>> {
        panic!("a search called `score` on heads that can read the policy's hidden states");
    }

    fn reads_policy_hidden(&self) -> bool {
        true
    }

    fn feature_depth(&self) -> Option<usize> {
        self.0.feature_depth()
    }

    fn feature_pooling(&self) -> ValuePooling {
        self.0.feature_pooling()
    }

    fn score_policy_hidden(&mut self, hidden: &tch::Tensor) -> Result<Vec<f64>> {
        self.1 += 1;
        self.0.score_policy_hidden(hidden)
    }
}

/// The same heads re-encoding every prefix with a forward of their own (`PolicyHeadEnsemble::score`): the
/// oracle for the decoder's states.
struct ReEncoding<'m>(PolicyHeadEnsemble<'m>);

impl PrefixScorer for ReEncoding<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        self.0.score(prompts, responses, finished)
    }
}

/// Two MLP heads on the policy's states after `depth` layers (`None`: the final states).
fn policy_heads(lm: &CausalLm, depth: Option<usize>) -> (ScalarModel, ScalarModel) {
    pooled_heads(lm, depth, ValuePooling::Last)
}

/// Two MLP heads reading the policy's states after `depth` layers pooled as `pooling` says.
fn pooled_heads(lm: &CausalLm, depth: Option<usize>, pooling: ValuePooling) -> (ScalarModel, ScalarModel) {
    let h = lm.config.hidden_size() * pooling.blocks();
    let head = |seed| ScalarModel {
        config: lm.config.clone(),
        backbone: lm.backbone.clone(),
        head: Head::Mlp(MlpHead::new(h, 16, seed, Device::Cpu)),
        depth,
        pooling,
    };
    (head(1), head(2))
}

#[test]
fn decoder_scoring_hidden_equals_a_full_forward_of_the_scored_sequences() {
    // The final states, and (tapped beside them) the states after the first of the fixture's 2 layers.
    for tap in [None, Some(1)] {
        scoring_hidden_at(tap);
    }
}

fn scoring_hidden_at(tap: Option<usize>) {
    let lm = policy();
    let _g = tch::no_grad_guard();
    // 6 tokens: some rows stop at one of EOS, others are cut off (last token unfed, EOS appended).
    let mut dec = Decoder::new_tapped(&lm, &prompts(), &[41, 42], 6, 3, tap).unwrap();
    let (index, forks): (Vec<i64>, Vec<u64>) = (0..8).map(|r| ((r / 4) as i64, (r % 4) as u64)).unzip();
    dec.reorder(&index, Some(&forks));
    let mut checked_mid_search = false;
    while !dec.all_finished() {
        dec.step(&SAMPLING, &EOS, 6);
        if !checked_mid_search && (0..8).any(|r| dec.is_finished(r)) && !dec.all_finished() {
            check_scoring_hidden(&lm, &mut dec, tap);
            checked_mid_search = true;
        }
    }
    let finished = check_scoring_hidden(&lm, &mut dec, tap);
    // Tapping leaves sampling alone: the same tokens as an untapped decoder with the same seeds.
    let mut plain = Decoder::new(&lm, &prompts(), &[41, 42], 6, 3).unwrap();
    plain.reorder(&index, Some(&forks));
    while !plain.all_finished() {
        plain.step(&SAMPLING, &EOS, 6);
    }
    assert!((0..8).all(|r| plain.tokens(r) == dec.tokens(r)), "tap {tap:?} changed the sampled tokens");
    assert!(finished.contains(&true) && finished.contains(&false), "want EOS-stopped and cut-off rows: {finished:?}");
    // Rewound: asking again gives the same states.
    let again = dec.scoring_hidden(&EOS);
    assert!(f64::try_from((again - dec.scoring_hidden(&EOS)).abs().max()).unwrap() == 0.0);
}

/// Compares the decoder's states with a fresh forward; returns which rows stopped at an EOS.
fn check_scoring_hidden(lm: &CausalLm, dec: &mut Decoder, depth: Option<usize>) -> Vec<bool> {
    let got = dec.scoring_hidden(&EOS);
    let rows = dec.batch();
    let mut seqs = Vec::new();
    let mut at_eos = Vec::new();
    for r in 0..rows {
        let mut s = prompts()[r / 4].clone();
        s.extend_from_slice(dec.tokens(r));
        let ends_at_eos = dec.tokens(r).last().is_some_and(|t| EOS.contains(t));
        if dec.is_finished(r) && !ends_at_eos {
            s.push(EOS[0]);
        }
        at_eos.push(ends_at_eos);
        seqs.push(s);
    }
    let width = seqs.iter().map(Vec::len).max().unwrap();
    let (ids, valid) = left_pad(&seqs, width, 3, Device::Cpu);
    let all = lm.backbone.forward_to_depth(&ids, &valid, &positions_from_valid(&valid), None, depth);
    let want = all.select(1, -1);
    let err = f64::try_from((&got - &want).abs().max()).unwrap();
    assert!(err <= 1e-4, "scoring_hidden (after {depth:?} layers) differs from a full forward by {err}");
    // The mean-pooled features: each row's states from its prompt's last token through its last, averaged.
    let means: Vec<Tensor> = seqs
        .iter()
        .enumerate()
        .map(|(r, s)| {
            let span = (s.len() - prompts()[r / 4].len() + 1) as i64;
            all.get(r as i64).narrow(0, width as i64 - span, span).mean_dim(0, false, Kind::Float)
        })
        .collect();
    let mean = Tensor::stack(&means, 0);
    for (pooling, want) in
        [(ValuePooling::Mean, mean.shallow_clone()), (ValuePooling::LastMean, Tensor::cat(&[&want, &mean], 1))]
    {
        let got = dec.scoring_features(&EOS, pooling);
        let err = f64::try_from((&got - want).abs().max()).unwrap();
        assert!(err <= 1e-4, "{pooling:?} features (after {depth:?} layers) differ from a full forward's by {err}");
    }
    if depth.is_some() {
        let last = lm.backbone.forward(&ids, &valid, &positions_from_valid(&valid), None).select(1, -1);
        assert!(f64::try_from((&got - last).abs().max()).unwrap() > 1e-3, "the tapped states are the final ones");
    }
    at_eos
}

#[test]
fn policy_heads_guide_cbs_from_the_decoders_states_as_re_encoding_would() {
    for depth in [None, Some(1)] {
        heads_guide_cbs_at(depth);
    }
    // One ensemble reads one depth.
    let lm = policy();
    let ((a, _), (b, _)) = (policy_heads(&lm, None), policy_heads(&lm, Some(1)));
    let err = PolicyHeadEnsemble::new(&lm, vec![(&a, 1.0), (&b, 1.0)], EOS.to_vec()).err().unwrap();
    assert!(err.to_string().contains("one depth"), "{err}");
}

fn heads_guide_cbs_at(depth: Option<usize>) {
    let lm = policy();
    let (v1, v2) = policy_heads(&lm, depth);
    let members = || vec![(&v1, 1.0), (&v2, 2.5)];
    let params = cbs_params(2, 3, 3, 10);
    let mut from_hidden = HiddenOnly(PolicyHeadEnsemble::new(&lm, members(), EOS.to_vec()).unwrap(), 0);
    let fast = chunk_beam_search(&lm, &prompts(), &[51, 52], &params, &mut from_hidden).unwrap().candidates;
    assert!(from_hidden.1 >= 3, "only {} chunks", from_hidden.1);
    let mut cached = CachedValueEnsemble::new(members(), EOS.to_vec(), 11).unwrap();
    let slow = chunk_beam_search(&lm, &prompts(), &[51, 52], &params, &mut cached).unwrap().candidates;
    for (f, s) in fast.iter().flatten().zip(slow.iter().flatten()) {
        assert_eq!(f.generation, s.generation, "the two scorers steered the search apart");
        assert!((f.score - s.score).abs() <= 1e-4, "scores {} vs {}", f.score, s.score);
    }
    let rows: Vec<_> = fast.iter().flatten().map(|c| c.generation.stopped_at_eos).collect();
    assert!(rows.contains(&true) && rows.contains(&false), "want both EOS-stopped and cut-off rows");
    // Outside a search the same ensemble runs the backbone once and agrees with re-encoding.
    let (p, r): (Vec<_>, Vec<_>) = fast[0].iter().map(|c| (prompts()[0].clone(), c.generation.tokens.clone())).unzip();
    let done = vec![true; r.len()];
    let mut heads = PolicyHeadEnsemble::new(&lm, members(), EOS.to_vec()).unwrap();
    let a = heads.score(&p, &r, &done).unwrap();
    let b = ValueEnsemble::new(members(), EOS.to_vec()).unwrap().score(&p, &r, &done).unwrap();
    assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-4), "{a:?} vs {b:?}");
    // A value model with a backbone of its own cannot read the policy's states.
    let own = scalar("llama_seqcls");
    let err = PolicyHeadEnsemble::new(&lm, vec![(&v1, 1.0), (&own, 1.0)], EOS.to_vec()).err().unwrap();
    assert!(err.to_string().contains("value model 1"), "{err}");
}

#[test]
fn pooled_heads_guide_cbs_from_the_decoders_running_sums_as_re_encoding_would() {
    let lm = policy();
    let params = cbs_params(2, 3, 3, 10);
    for depth in [None, Some(1)] {
        for pooling in [ValuePooling::Mean, ValuePooling::LastMean] {
            let (v1, v2) = pooled_heads(&lm, depth, pooling);
            let members = || vec![(&v1, 1.0), (&v2, 2.5)];
            let mut from_decoder = HiddenOnly(PolicyHeadEnsemble::new(&lm, members(), EOS.to_vec()).unwrap(), 0);
            let fast = chunk_beam_search(&lm, &prompts(), &[51, 52], &params, &mut from_decoder).unwrap().candidates;
            assert!(from_decoder.1 >= 3, "only {} chunks", from_decoder.1);
            let mut oracle = ReEncoding(PolicyHeadEnsemble::new(&lm, members(), EOS.to_vec()).unwrap());
            let slow = chunk_beam_search(&lm, &prompts(), &[51, 52], &params, &mut oracle).unwrap().candidates;
            for (f, s) in fast.iter().flatten().zip(slow.iter().flatten()) {
                // Same tokens; a log-probability may differ in its last bits where a kept row sat at another index
                // of the batch.
                let (f, s) = (&f.generation, &s.generation);
                assert_eq!((&f.tokens, f.stopped_at_eos), (&s.tokens, s.stopped_at_eos), "{pooling:?} after {depth:?}");
                assert!(f.logprobs.iter().zip(&s.logprobs).all(|(a, b)| (a - b).abs() <= 1e-5), "{f:?} vs {s:?}");
            }
            for (f, s) in fast.iter().flatten().zip(slow.iter().flatten()) {
                assert!((f.score - s.score).abs() <= 1e-4, "{pooling:?}: scores {} vs {}", f.score, s.score);
            }
        }
    }
    // One ensemble reads one pooling.
    let ((a, _), (b, _)) = (pooled_heads(&lm, None, ValuePooling::Last), pooled_heads(&lm, None, ValuePooling::Mean));
    let err = PolicyHeadEnsemble::new(&lm, vec![(&a, 1.0), (&b, 1.0)], EOS.to_vec()).err().unwrap();
    assert!(err.to_string().contains("one pooling"), "{err}");
}

/// Every 8th token ends a row: rows stop after about 8 tokens, so within 16 some prompts have all their rows
/// finished after the first chunks while others run to the limit.
fn many_eos() -> Vec<i64> {
    (0..512).step_by(8).collect()
}

/// CBS(W = 2, K = 2, L = 2) over a set of prompts with the many-EOS set, one re-encoding value as the guide.
fn cbs_many_eos(lm: &CausalLm, v: &ScalarModel, prompts: &[Vec<i64>], seeds: &[u64]) -> iro_worker::search::CbsOutput {
    let mut values = ValueEnsemble::new(vec![(v, 1.0)], many_eos()).unwrap();
    let mut params = cbs_params(2, 2, 2, 16);
    params.eos_token_ids = many_eos();
    chunk_beam_search(lm, prompts, seeds, &params, &mut values).unwrap()
}

fn same_rows(a: &[iro_worker::search::Candidate], b: &[iro_worker::search::Candidate], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: row count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        // Tokens and stops exactly; log-probabilities up to float noise (the batch's shape changes the GEMMs).
        assert_eq!(x.generation.tokens, y.generation.tokens, "{what}: row {i} differs");
        assert_eq!(x.generation.stopped_at_eos, y.generation.stopped_at_eos, "{what}: row {i} stop");
        for (a, b) in x.generation.logprobs.iter().zip(&y.generation.logprobs) {
            assert!((a - b).abs() <= 1e-4, "{what}: row {i} log-probability {a} vs {b}");
        }
        assert!((x.score - y.score).abs() <= 1e-4, "{what}: row {i} score {} vs {}", x.score, y.score);
    }
}

#[test]
fn a_prompts_cbs_result_does_not_depend_on_the_prompts_sharing_its_batch() {
    let lm = policy();
    let v = scalar("llama_seqcls");
    let p = prompts();
    // Seeds for which a prompt is done early (every row finished, or its kept beams all finished, by token 12)
    // and seeds for which its search runs to max_new_tokens: found by search, so the test checks both orders of
    // finishing.
    let mut early = None;
    let mut late = None;
    for seed in 0..200u64 {
        let alone = cbs_many_eos(&lm, &v, &p[..1], &[seed]);
        let rows = &alone.candidates[0];
        let longest = rows.iter().map(|c| c.generation.tokens.len()).max().unwrap();
        if early.is_none() && longest <= 12 {
            early = Some((seed, alone));
        } else if late.is_none() && longest == 16 {
            late = Some((seed, alone));
        }
        if early.is_some() && late.is_some() {
            break;
        }
    }
    let (early_seed, early_alone) = early.expect("no seed lets prompt 0 finish within 12 tokens");
    let (late_seed, late_alone) = late.expect("no seed runs prompt 0 to the limit");
    let late_b = (0..200u64)
        .find(|&s| cbs_many_eos(&lm, &v, &p[1..], &[s]).candidates[0].iter().any(|c| c.generation.tokens.len() == 16))
        .expect("no seed runs prompt 1 to the limit");
    // Prompt 0 finishes early while prompt 1 runs on (the case that used to collapse its pool to W rows).
    let both = cbs_many_eos(&lm, &v, &p, &[early_seed, late_b]);
    same_rows(&both.candidates[0], &early_alone.candidates[0], "early prompt, batched with a later one");
    assert_eq!(both.sampled[0], early_alone.sampled[0], "tokens sampled for the early prompt");
    // Its pool keeps the W·K rows it had when it finished: not W distinct rows copied K times.
    let distinct: std::collections::HashSet<_> = both.candidates[0].iter().map(|c| &c.generation.tokens).collect();
    let alone_distinct: std::collections::HashSet<_> =
        early_alone.candidates[0].iter().map(|c| &c.generation.tokens).collect();
    assert_eq!(distinct.len(), alone_distinct.len());
    // A prompt that runs to the limit beside one that finishes first (the same prompt under the early seed),
    // and the early one second in its batch, beside a longer prompt that runs on.
    let both = cbs_many_eos(&lm, &v, &[p[0].clone(), p[0].clone()], &[late_seed, early_seed]);
    same_rows(&both.candidates[0], &late_alone.candidates[0], "late prompt, batched with an earlier one");
    same_rows(&both.candidates[1], &early_alone.candidates[0], "early prompt, second in its batch");
    assert_eq!(both.sampled, vec![late_alone.sampled[0], early_alone.sampled[0]]);
    let both = cbs_many_eos(&lm, &v, &[p[1].clone(), p[0].clone()], &[late_b, early_seed]);
    let b_alone = cbs_many_eos(&lm, &v, &p[1..], &[late_b]);
    same_rows(&both.candidates[0], &b_alone.candidates[0], "late prompt first in its batch");
    same_rows(&both.candidates[1], &early_alone.candidates[0], "early prompt after a longer prompt");
    // Sampled tokens are counted per live row and step: never more than W·K rows × the longest row.
    let rows = &late_alone.candidates[0];
    assert!(late_alone.sampled[0] <= 4 * 16 && late_alone.sampled[0] >= 16);
    assert!(late_alone.sampled[0] as usize >= rows.iter().map(|c| c.generation.tokens.len()).max().unwrap());
}
