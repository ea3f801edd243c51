//! Scores of partial responses: what guides CBS and ARGS and picks Best-of-N. A value ensemble scores
//! `s = Σ_i V_i(x ⊕ y) / beta_i`, each V_i read at the last real token; a finished row is scored with EOS
//! appended (unless it already ends with one), as the value functions were trained on complete responses.
//!
//! TODO(cross-tokenizer): value models are assumed to share the policy's tokenizer, so token ids pass
//! straight through. A value model on another tokenizer needs the partial response decoded to text and
//! re-tokenised (iro.md); the cached scorer then has to re-encode from the last token boundary that
//! survives re-tokenisation.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::generate::kv_cache::KvCache;
use crate::generate::{left_pad, right_pad};
use crate::model::heads::{Head, gather_last};
use crate::model::{Backbone, CausalLm, ScalarModel, positions_from_valid};
use crate::train::pool_columns;
use iro_common::config::ValuePooling;

/// One score per row for `prompts[i] ⊕ responses[i]`.
pub trait PrefixScorer {
    /// `finished[i]`: row i is complete (scored with EOS appended).
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>>;

    /// True when the scorer is a head on the policy's own backbone: a search then hands it the hidden states
    /// its decoder already computed (`score_policy_hidden`) instead of calling `score`.
    fn reads_policy_hidden(&self) -> bool {
        false
    }

    /// Scores from `hidden` [B, H], the policy's final hidden state at the last token of each row's scored
    /// sequence (`Decoder::scoring_hidden`). Called only when `reads_policy_hidden` is true.
    fn score_policy_hidden(&mut self, _hidden: &Tensor) -> Result<Vec<f64>> {
        Err(Error::InvalidRequest("this scorer runs its own model; it does not read the policy's hidden states".into()))
    }

    /// With `reads_policy_hidden`: the states after how many decoder layers it reads (`None`: the final ones).
    fn feature_depth(&self) -> Option<usize> {
        None
    }

    /// With `reads_policy_hidden`: how it pools those states (`Decoder::scoring_features`).
    fn feature_pooling(&self) -> ValuePooling {
        ValuePooling::Last
    }

    /// The caller's rows were reordered: new row i is old row `index[i]`. Stateful scorers move their
    /// per-row state along; stateless ones ignore it.
    fn reorder(&mut self, _index: &[i64]) {}

    /// Drop per-row state: the next call starts a new batch.
    fn reset(&mut self) {}
}

/// Any closure with `score`'s signature is a stateless scorer (test doubles, implicit rewards, ...).
impl<F> PrefixScorer for F
where
    F: FnMut(&[Vec<i64>], &[Vec<i64>], &[bool]) -> Result<Vec<f64>>,
{
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        self(prompts, responses, finished)
    }
}

/// `Σ_i V_i / beta_i` over scalar models sharing the policy's tokenizer, re-encoding every prefix from
/// scratch at each call. Also a reward model: one member with beta 1.
pub struct ValueEnsemble<'m> {
    members: Vec<(&'m ScalarModel, f64)>,
    eos: Vec<i64>,
}

impl<'m> ValueEnsemble<'m> {
    /// `members`: (model, beta). `eos_token_ids`: a finished row that does not end in one of them gets
    /// the first appended.
    pub fn new(members: Vec<(&'m ScalarModel, f64)>, eos_token_ids: Vec<i64>) -> Result<Self> {
        check_members(&members, &eos_token_ids)?;
        check_unpooled(&members)?;
        Ok(Self { members, eos: eos_token_ids })
    }
}

impl PrefixScorer for ValueEnsemble<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        let seqs = full_sequences(prompts, responses, finished, &self.eos)?;
        let _g = tch::no_grad_guard();
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let members = self.members.iter().map(|&(model, beta)| {
            let (ids, valid) = left_pad(&seqs, width, 0, model.backbone.device());
            (to_f64(&model.score(&ids, &valid)), beta)
        });
        Ok(weighted_sum(seqs.len(), members))
    }
}

/// The same ensemble with a KV cache per value model kept across calls: each call feeds only the tokens
/// a row gained since the last call (a CBS chunk, an ARGS candidate, the EOS of a finished row), and
/// `reorder` moves the caches with the policy's rows. The cache is only an optimisation: when a row is not
/// an extension of what was fed (new batch, different row count) or would overflow the cache, every row is
/// re-encoded from scratch, so results always equal `ValueEnsemble`'s.
pub struct CachedValueEnsemble<'m> {
    members: Vec<(&'m ScalarModel, f64)>,
    eos: Vec<i64>,
    headroom: usize,
    state: Option<CacheState>,
    prefills: usize,
}

struct CacheState {
    /// One per member.
    caches: Vec<KvCache>,
    /// Per member, per row: the value at the last fed token.
    values: Vec<Vec<f64>>,
    /// Per row: every real token fed so far (prompt, response, maybe EOS).
    fed: Vec<Vec<i64>>,
}

impl<'m> CachedValueEnsemble<'m> {
    /// `headroom`: tokens each row may gain after the first call before the caches are rebuilt
    /// (`max_new_tokens + 1` covers a whole search, EOS included).
    pub fn new(members: Vec<(&'m ScalarModel, f64)>, eos_token_ids: Vec<i64>, headroom: usize) -> Result<Self> {
        check_members(&members, &eos_token_ids)?;
        check_unpooled(&members)?;
        Ok(Self { members, eos: eos_token_ids, headroom, state: None, prefills: 0 })
    }

    /// How many times every row was encoded from scratch (1 per search when the cache does its job).
    pub fn prefills(&self) -> usize {
        self.prefills
    }

    fn prefill(&mut self, seqs: Vec<Vec<i64>>) {
        self.prefills += 1;
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut caches = Vec::with_capacity(self.members.len());
        let mut values = Vec::with_capacity(self.members.len());
        for &(model, _) in &self.members {
            let (ids, valid) = left_pad(&seqs, width, 0, model.backbone.device());
            let positions = positions_from_valid(&valid);
            let mut cache = model.backbone.new_cache(seqs.len() as i64, (width + self.headroom) as i64);
            let v = model.values(&ids, &valid, &positions, Some(&mut cache));
            values.push(to_f64(&gather_last(&v, &valid)));
            caches.push(cache);
        }
        self.state = Some(CacheState { caches, values, fed: seqs });
    }

    fn total(&self) -> Vec<f64> {
        let state = self.state.as_ref().expect("scored before any prefill");
        weighted_sum(state.fed.len(), self.members.iter().zip(&state.values).map(|(&(_, beta), v)| (v, beta)))
    }
}

impl PrefixScorer for CachedValueEnsemble<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        let seqs = full_sequences(prompts, responses, finished, &self.eos)?;
        let _g = tch::no_grad_guard();
        let Some(state) = self.state.as_mut() else {
            self.prefill(seqs);
            return Ok(self.total());
        };
        let extends = state.fed.len() == seqs.len() && state.fed.iter().zip(&seqs).all(|(f, s)| s.starts_with(f));
        let new: Vec<&[i64]> =
            if extends { seqs.iter().zip(&state.fed).map(|(s, f)| &s[f.len()..]).collect() } else { vec![] };
        let block = new.iter().map(|n| n.len()).max().unwrap_or(0);
        let fits = state.caches.iter().all(|c| c.len() + block as i64 <= c.capacity());
        if !extends || !fits {
            self.prefill(seqs);
            return Ok(self.total());
        }
        if block > 0 {
            // Each row's new tokens, right-padded to the block: the padding slots stay invalid, and rotary
            // positions continue from each row's own count of real tokens.
            let fed: Vec<i64> = state.fed.iter().map(|f| f.len() as i64).collect();
            for (m, &(model, _)) in self.members.iter().enumerate() {
                let device = model.backbone.device();
                let (ids, valid_t) = right_pad(&new, block, 0, device);
                let positions = Tensor::from_slice(&fed).to_device(device).unsqueeze(1)
                    + Tensor::arange(block as i64, (Kind::Int64, device)).unsqueeze(0);
                let v = model.values(&ids, &valid_t, &positions, Some(&mut state.caches[m]));
                let last = to_f64(&gather_last(&v, &valid_t));
                for (r, n) in new.iter().enumerate() {
                    if !n.is_empty() {
                        state.values[m][r] = last[r];
                    }
                }
            }
            for (f, n) in state.fed.iter_mut().zip(&new) {
                f.extend_from_slice(n);
            }
        }
        Ok(self.total())
    }

    fn reorder(&mut self, index: &[i64]) {
        let Some(state) = self.state.as_mut() else { return };
        let t = Tensor::from_slice(index);
        for c in &mut state.caches {
            c.reorder(&t);
        }
        for v in &mut state.values {
            *v = index.iter().map(|&i| v[i as usize]).collect();
        }
        state.fed = index.iter().map(|&i| state.fed[i as usize].clone()).collect();
    }

    fn reset(&mut self) {
        self.state = None;
    }
}

/// `Σ_i V_i / beta_i` for `head`-kind value functions: small heads on the frozen policy's own backbone. Inside
/// a search they read the hidden states the policy's decoder has just computed, so guidance costs no forward
/// pass of its own (`Decoder::scoring_hidden`); `score`, outside a search, runs the backbone once for all heads.
pub struct PolicyHeadEnsemble<'m> {
    backbone: &'m Backbone,
    heads: Vec<(&'m Head, f64)>,
    eos: Vec<i64>,
    /// The layer count every member reads its states after (`ScalarModel::depth`).
    depth: Option<usize>,
    /// How every member pools them (`ScalarModel::pooling`).
    pooling: ValuePooling,
}

impl<'m> PolicyHeadEnsemble<'m> {
    /// Every member must sit on `policy`'s backbone (the same loaded weights, not merely equal ones): the hidden
    /// states a search hands over are that backbone's.
    pub fn new(policy: &'m CausalLm, members: Vec<(&'m ScalarModel, f64)>, eos_token_ids: Vec<i64>) -> Result<Self> {
        check_members(&members, &eos_token_ids)?;
        if let Some(i) = members.iter().position(|(m, _)| !std::sync::Arc::ptr_eq(&m.backbone, &policy.backbone)) {
            return Err(Error::InvalidRequest(format!(
                "value model {i} has a backbone of its own: only heads on the policy's backbone read its hidden states"
            )));
        }
        let depth = members.first().and_then(|(m, _)| m.depth);
        if let Some(i) = members.iter().position(|(m, _)| m.depth != depth) {
            return Err(Error::InvalidRequest(format!(
                "value head {i} reads the states after {:?} layers, head 0 after {depth:?}: one ensemble reads one depth",
                members[i].0.depth
            )));
        }
        let pooling = members.first().map_or(ValuePooling::Last, |(m, _)| m.pooling);
        if let Some(i) = members.iter().position(|(m, _)| m.pooling != pooling) {
            return Err(Error::InvalidRequest(format!(
                "value head {i} pools its states as `{}`, head 0 as `{}`: one ensemble reads one pooling",
                members[i].0.pooling.as_str(),
                pooling.as_str()
            )));
        }
        let heads = members.into_iter().map(|(m, beta)| (&m.head, beta)).collect();
        Ok(Self { backbone: &policy.backbone, heads, eos: eos_token_ids, depth, pooling })
    }

    /// `Σ_i head_i(h) / beta_i` for `hidden` [B, H].
    fn combine(&self, hidden: &Tensor) -> Vec<f64> {
        let hidden = hidden.unsqueeze(1);
        let heads = self.heads.iter().map(|&(head, beta)| (to_f64(&head.forward(&hidden).squeeze_dim(1)), beta));
        weighted_sum(hidden.size()[0] as usize, heads)
    }
}

impl PrefixScorer for PolicyHeadEnsemble<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        let seqs = full_sequences(prompts, responses, finished, &self.eos)?;
        let _g = tch::no_grad_guard();
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (ids, valid) = left_pad(&seqs, width, 0, self.backbone.device());
        let hidden = self.backbone.forward_to_depth(&ids, &valid, &positions_from_valid(&valid), None, self.depth);
        // Left padding: every row's last token sits in the last column, its prompt's last token `tail` before it.
        let ends = vec![width as i64 - 1; seqs.len()];
        let starts: Vec<i64> =
            seqs.iter().zip(prompts).map(|(s, p)| (width - (s.len() - p.len()) - 1) as i64).collect();
        Ok(self.combine(&pool_columns(&hidden, &starts, &ends, self.pooling)))
    }

    fn reads_policy_hidden(&self) -> bool {
        true
    }

    fn feature_depth(&self) -> Option<usize> {
        self.depth
    }

    fn feature_pooling(&self) -> ValuePooling {
        self.pooling
    }

    fn score_policy_hidden(&mut self, hidden: &Tensor) -> Result<Vec<f64>> {
        let _g = tch::no_grad_guard();
        Ok(self.combine(hidden))
    }
}

/// `Σ_i values_i / beta_i`, row by row: every ensemble's score.
fn weighted_sum<V: AsRef<[f64]>>(rows: usize, members: impl IntoIterator<Item = (V, f64)>) -> Vec<f64> {
    let mut total = vec![0.0; rows];
    for (values, beta) in members {
        for (t, v) in total.iter_mut().zip(values.as_ref()) {
            *t += v / beta;
        }
    }
    total
}

fn check_members(members: &[(&ScalarModel, f64)], eos: &[i64]) -> Result<()> {
    if members.is_empty() {
        return Err(Error::InvalidRequest("a value ensemble needs at least one model".into()));
    }
    if let Some((i, (_, b))) = members.iter().enumerate().find(|(_, (_, b))| !(*b > 0.0 && b.is_finite())) {
        return Err(Error::InvalidRequest(format!("value model {i}: beta must be positive and finite, got {b}")));
    }
    if eos.is_empty() {
        return Err(Error::InvalidRequest("a value ensemble needs an EOS id to score finished rows".into()));
    }
    Ok(())
}

/// These ensembles read each member's state at the last token; a pooled head reads the policy's states through
/// `PolicyHeadEnsemble`, which pools them.
fn check_unpooled(members: &[(&ScalarModel, f64)]) -> Result<()> {
    match members.iter().position(|(m, _)| m.pooling != ValuePooling::Last) {
        Some(i) => Err(Error::InvalidRequest(format!(
            "value model {i} pools its states (`{}`): only heads on the policy's backbone (PolicyHeadEnsemble) pool",
            members[i].0.pooling.as_str()
        ))),
        None => Ok(()),
    }
}

/// prompt ⊕ response, with `eos[0]` appended to finished rows not already ending in an EOS.
fn full_sequences(
    prompts: &[Vec<i64>],
    responses: &[Vec<i64>],
    finished: &[bool],
    eos: &[i64],
) -> Result<Vec<Vec<i64>>> {
    if prompts.len() != responses.len() || prompts.len() != finished.len() || prompts.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "scoring {} prompts, {} responses, {} finished flags",
            prompts.len(),
            responses.len(),
            finished.len()
        )));
    }
    Ok(prompts
        .iter()
        .zip(responses)
        .zip(finished)
        .map(|((p, r), &done)| {
            let mut s = Vec::with_capacity(p.len() + r.len() + 1);
            s.extend_from_slice(p);
            s.extend_from_slice(r);
            if done && !r.last().is_some_and(|t| eos.contains(t)) {
                s.push(eos[0]);
            }
            s
        })
        .collect())
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu)).expect("scores to f64")
}
