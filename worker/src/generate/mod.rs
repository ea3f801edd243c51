//! Batched generation with a KV cache: left-padded prompts are prefilled once, then every step feeds one
//! token per row. Rows finish at EOS at different times; the decoder's rows can be reordered or
//! replicated by index (cache included), which guided search uses to keep the prefixes it selects.

pub mod kv_cache;
pub mod sampler;

use tch::{Device, Kind, Tensor};

use self::kv_cache::KvCache;
use self::sampler::{RowRng, SamplingParams};
use crate::error::{Error, Result};
use crate::model::{CausalLm, positions_from_valid};
use iro_common::config::ValuePooling;

/// One finished (or cut-off) response.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, the EOS token included when the row stopped on one.
    pub tokens: Vec<i64>,
    /// Log-probability of each generated token under the unmodified model distribution.
    pub logprobs: Vec<f32>,
    /// True when the row stopped at an EOS token (false: cut at max_new_tokens).
    pub stopped_at_eos: bool,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: i64,
}

/// Decoding state of a batch: the cache, the logits for each row's next token, and what each row has
/// produced so far. All rows advance together; a finished row is fed padding that nothing attends to.
pub struct Decoder<'m> {
    model: &'m CausalLm,
    cache: KvCache,
    /// [B, V] logits of the next token.
    next_logits: Tensor,
    /// [B] rotary position of the next token.
    next_pos: Tensor,
    /// [B, H] the hidden state at each row's last token fed through the model (what a value head on the
    /// policy's own backbone reads, so guided search needs no second forward pass for it): after the final layer,
    /// or after the first `tap` layers.
    last_hidden: Tensor,
    /// [B, H] f32: the sum of those states over every token of a row fed so far from the prompt's last one on, and
    /// [B, 1] how many that is: a mean-pooled value head's input (`value.pooling`) without keeping every state.
    hidden_sum: Tensor,
    hidden_count: Tensor,
    rows: Vec<RowState>,
    pad: i64,
    /// The layer count whose states `last_hidden` holds (`None`: the final states, those the logits come from).
    tap: Option<usize>,
}

#[derive(Debug, Clone)]
struct RowState {
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    finished: bool,
    stopped_at_eos: bool,
    /// The last sampled token has not been fed yet (the step that sampled it finished every row).
    unfed: bool,
    rng: RowRng,
}

impl<'m> Decoder<'m> {
    /// Prefills `prompts` (token ids, left-padded here) with room for `max_new_tokens` more per row.
    /// `seeds[i]` seeds row i's sampler.
    pub fn new(
        model: &'m CausalLm,
        prompts: &[Vec<i64>],
        seeds: &[u64],
        max_new_tokens: usize,
        pad: i64,
    ) -> Result<Self> {
        Self::new_tapped(model, prompts, seeds, max_new_tokens, pad, None)
    }

    /// `new`, with `scoring_hidden` giving the states after the first `tap` decoder layers (an intermediate-layer
    /// value head's input) instead of the final ones; sampling is unchanged.
    pub fn new_tapped(
        model: &'m CausalLm,
        prompts: &[Vec<i64>],
        seeds: &[u64],
        max_new_tokens: usize,
        pad: i64,
        tap: Option<usize>,
    ) -> Result<Self> {
        if prompts.is_empty() || prompts.len() != seeds.len() {
            return Err(Error::InvalidRequest(format!("{} prompts with {} seeds", prompts.len(), seeds.len())));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::InvalidRequest(format!("prompt {i} has no tokens")));
        }
        let device = model.backbone.device();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let (ids, valid) = left_pad(prompts, width, pad, device);
        let positions = positions_from_valid(&valid);
        // Two slots beyond the generation: `scoring_hidden` may feed a cut-off row's last token and an EOS.
        let mut cache = model.backbone.new_cache(prompts.len() as i64, (width + max_new_tokens + 2) as i64);
        let (hidden, features) = model.backbone.forward_tapped(&ids, &valid, &positions, Some(&mut cache), tap);
        let last_hidden = features.select(1, -1);
        let hidden_sum = last_hidden.to_kind(Kind::Float);
        let hidden_count = Tensor::ones([prompts.len() as i64, 1], (Kind::Float, device));
        // Only the last position's logits are needed: skip the [B, T, V] projection of the whole prompt.
        let next_logits = model.logits(&hidden.select(1, -1));
        let next_pos = positions.select(1, -1) + 1;
        let rows = seeds
            .iter()
            .map(|&s| RowState {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finished: false,
                stopped_at_eos: false,
                unfed: false,
                rng: RowRng::new(s),
            })
            .collect();
        Ok(Self { model, cache, next_logits, next_pos, last_hidden, hidden_sum, hidden_count, rows, pad, tap })
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    pub fn all_finished(&self) -> bool {
        self.rows.iter().all(|r| r.finished)
    }

    pub fn is_finished(&self, row: usize) -> bool {
        self.rows[row].finished
    }

    pub fn tokens(&self, row: usize) -> &[i64] {
        &self.rows[row].tokens
    }

    /// Samples one token for every unfinished row; a row finishes on EOS or when it reaches `max_new_tokens`.
    /// Feeds the new tokens through the model unless every row is finished.
    pub fn step(&mut self, params: &SamplingParams, eos: &[i64], max_new_tokens: usize) {
        let mut rngs: Vec<RowRng> = self.rows.iter().map(|r| r.rng.clone()).collect();
        let (tokens, logprobs) = sampler::sample(&self.next_logits, params, &mut rngs);
        let mut fed = Vec::with_capacity(self.rows.len());
        let mut live = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            if row.finished {
                fed.push(self.pad);
                live.push(false);
                continue;
            }
            row.rng = rngs[i].clone();
            row.tokens.push(tokens[i]);
            row.logprobs.push(logprobs[i]);
            row.stopped_at_eos = eos.contains(&tokens[i]);
            row.finished = row.stopped_at_eos || row.tokens.len() >= max_new_tokens;
            fed.push(tokens[i]);
            live.push(true);
        }
        if self.all_finished() {
            for (row, &fresh) in self.rows.iter_mut().zip(&live) {
                row.unfed |= fresh;
            }
            return;
        }
        if self.cache.len() >= self.cache.capacity() - 2 {
            // Cannot happen when max_new_tokens matches the one given to `new`; stop rather than overflow,
            // keeping the two slots `scoring_hidden` may need.
            for (row, &fresh) in self.rows.iter_mut().zip(&live) {
                row.finished = true;
                row.unfed |= fresh;
            }
            return;
        }
        let device = self.model.backbone.device();
        let ids = Tensor::from_slice(&fed).to_device(device).unsqueeze(1);
        let valid = Tensor::from_slice(&live).to_device(device).unsqueeze(1);
        let positions = self.next_pos.unsqueeze(1);
        let (hidden, features) =
            self.model.backbone.forward_tapped(&ids, &valid, &positions, Some(&mut self.cache), self.tap);
        self.next_logits = self.model.logits(&hidden.select(1, 0));
        // A finished row was fed padding: it keeps the hidden state of its own last token.
        let fresh = features.select(1, 0);
        self.last_hidden = fresh.where_self(&valid, &self.last_hidden);
        let live = valid.to_kind(Kind::Float);
        self.hidden_sum = &self.hidden_sum + fresh.to_kind(Kind::Float) * &live;
        self.hidden_count = &self.hidden_count + live;
        self.next_pos = &self.next_pos + 1;
    }

    /// [B, H] hidden states (final, or after the `tap` layers) at the last token of what a value function scores for
    /// each row: prompt ⊕ response, with `eos[0]` appended to a finished row that does not end in an EOS (as
    /// `PrefixScorer`s score it; with no EOS given, nothing is appended). `scoring_features` with `last` pooling.
    pub fn scoring_hidden(&mut self, eos: &[i64]) -> Tensor {
        self.scoring_features(eos, ValuePooling::Last)
    }

    /// What a value head with `pooling` reads for each row's scored sequence (as `scoring_hidden` defines it): the
    /// state at its last token, the mean of its states from the prompt's last token on, or both ([B, 2H]), as
    /// `train::pool_prefixes` pools a training example. Usually the decoder holds them already; a row whose last
    /// token was never fed, or that needs the EOS, gets one extra forward of at most two tokens through the
    /// decoder's own cache, which is then rewound, so decoding is unaffected.
    pub fn scoring_features(&mut self, eos: &[i64], pooling: ValuePooling) -> Tensor {
        let pending: Vec<Vec<i64>> = self
            .rows
            .iter()
            .map(|r| {
                let mut feed = Vec::new();
                if r.unfed {
                    feed.push(*r.tokens.last().expect("an unfed row has sampled a token"));
                }
                if let Some(&first) = eos.first()
                    && r.finished
                    && !r.tokens.last().is_some_and(|t| eos.contains(t))
                {
                    feed.push(first);
                }
                feed
            })
            .collect();
        let block = pending.iter().map(Vec::len).max().unwrap_or(0);
        let (last, sum, count) = if block == 0 {
            (self.last_hidden.shallow_clone(), self.hidden_sum.shallow_clone(), self.hidden_count.shallow_clone())
        } else {
            assert!(
                self.cache.len() + block as i64 <= self.cache.capacity(),
                "scoring_features: {} + {block} slots exceed the cache ({}); step was given a longer max_new_tokens than new",
                self.cache.len(),
                self.cache.capacity(),
            );
            let (rows, device) = (self.rows.len() as i64, self.next_logits.device());
            let (ids, valid) = right_pad(&pending, block, self.pad, device);
            let last: Vec<i64> = pending.iter().map(|feed| feed.len().saturating_sub(1) as i64).collect();
            let positions =
                self.next_pos.unsqueeze(1) + Tensor::arange(block as i64, (Kind::Int64, device)).unsqueeze(0);
            let len = self.cache.len();
            let (_, hidden) =
                self.model.backbone.forward_tapped(&ids, &valid, &positions, Some(&mut self.cache), self.tap);
            self.cache.rewind(len);
            let h = hidden.size()[2];
            let index = Tensor::from_slice(&last).to_device(device).view([rows, 1, 1]).expand([rows, 1, h], true);
            let fed = hidden.gather(1, &index, false).squeeze_dim(1);
            let any = valid.any_dim(1, true);
            let live = valid.to_kind(Kind::Float).unsqueeze(-1);
            let sum = &self.hidden_sum + (hidden.to_kind(Kind::Float) * &live).sum_dim_intlist(1, false, Kind::Float);
            let count = &self.hidden_count + live.sum_dim_intlist(1, false, Kind::Float);
            (fed.where_self(&any, &self.last_hidden), sum, count)
        };
        crate::train::features::pool(pooling, || last, || sum / count)
    }

    /// Ends `rows` where they stand (cut off, not at EOS): they sample nothing more. Guided search stops a
    /// prompt's unfinished rows this way when the prompt is done.
    pub fn stop_rows(&mut self, rows: &[usize]) {
        for &r in rows {
            self.rows[r].finished = true;
        }
    }

    /// New row i is old row `index[i]`; `forks[i]` (when given) re-seeds it so replicas sample differently.
    pub fn reorder(&mut self, index: &[i64], forks: Option<&[u64]>) {
        let t = Tensor::from_slice(index).to_device(self.next_logits.device());
        self.cache.reorder(&t);
        self.next_logits = self.next_logits.index_select(0, &t);
        self.next_pos = self.next_pos.index_select(0, &t);
        self.last_hidden = self.last_hidden.index_select(0, &t);
        self.hidden_sum = self.hidden_sum.index_select(0, &t);
        self.hidden_count = self.hidden_count.index_select(0, &t);
        self.rows = index
            .iter()
            .enumerate()
            .map(|(i, &j)| {
                let mut row = self.rows[j as usize].clone();
                if let Some(f) = forks {
                    row.rng = row.rng.fork(f[i]);
                }
                row
            })
            .collect();
    }

    pub fn finish(self) -> Vec<Generation> {
        self.rows
            .into_iter()
            .map(|r| Generation { tokens: r.tokens, logprobs: r.logprobs, stopped_at_eos: r.stopped_at_eos })
            .collect()
    }
}

/// Generates for a batch of tokenised prompts until every row stops.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    seeds: &[u64],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let _guard = tch::no_grad_guard();
    let mut dec = Decoder::new(model, prompts, seeds, opts.max_new_tokens, opts.pad_token_id)?;
    while !dec.all_finished() {
        dec.step(&opts.sampling, &opts.eos_token_ids, opts.max_new_tokens);
    }
    Ok(dec.finish())
}

/// [B, width] ids and validity, each row right-aligned (left padding): prompts, whole sequences.
pub fn left_pad<R: AsRef<[i64]>>(rows: &[R], width: usize, pad: i64, device: Device) -> (Tensor, Tensor) {
    padded(rows, width, pad, device, true)
}

/// [B, width] ids and validity, each row left-aligned (right padding): a block of new tokens fed after what a
/// cache already holds, each row's positions continuing its own.
pub fn right_pad<R: AsRef<[i64]>>(rows: &[R], width: usize, pad: i64, device: Device) -> (Tensor, Tensor) {
    padded(rows, width, pad, device, false)
}

fn padded<R: AsRef<[i64]>>(rows: &[R], width: usize, pad: i64, device: Device, left: bool) -> (Tensor, Tensor) {
    let mut ids = vec![pad; rows.len() * width];
    let mut valid = vec![false; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        let row = row.as_ref();
        let start = if left { r * width + width - row.len() } else { r * width };
        ids[start..start + row.len()].copy_from_slice(row);
        valid[start..start + row.len()].fill(true);
    }
    let shape = [rows.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&valid).view(shape).to_device(device).to_kind(Kind::Bool),
    )
}
