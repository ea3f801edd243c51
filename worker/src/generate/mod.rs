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
    rows: Vec<RowState>,
    pad: i64,
}

#[derive(Debug, Clone)]
struct RowState {
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    finished: bool,
    stopped_at_eos: bool,
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
        let mut cache = model.backbone.new_cache(prompts.len() as i64, (width + max_new_tokens) as i64);
        let hidden = model.backbone.forward(&ids, &valid, &positions, Some(&mut cache));
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
                rng: RowRng::new(s),
            })
            .collect();
        Ok(Self { model, cache, next_logits, next_pos, rows, pad })
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
            return;
        }
        if self.cache.len() >= self.cache.capacity() {
            // Cannot happen when max_new_tokens matches the capacity given to `new`; stop rather than overflow.
            for r in &mut self.rows {
                r.finished = true;
            }
            return;
        }
        let device = self.model.backbone.device();
        let ids = Tensor::from_slice(&fed).to_device(device).unsqueeze(1);
        let valid = Tensor::from_slice(&live).to_device(device).unsqueeze(1);
        let positions = self.next_pos.unsqueeze(1);
        let hidden = self.model.backbone.forward(&ids, &valid, &positions, Some(&mut self.cache));
        self.next_logits = self.model.logits(&hidden.select(1, 0));
        self.next_pos = &self.next_pos + 1;
    }

    /// New row i is old row `index[i]`; `forks[i]` (when given) re-seeds it so replicas sample differently.
    pub fn reorder(&mut self, index: &[i64], forks: Option<&[u64]>) {
        let t = Tensor::from_slice(index).to_device(self.next_logits.device());
        self.cache.reorder(&t);
        self.next_logits = self.next_logits.index_select(0, &t);
        self.next_pos = self.next_pos.index_select(0, &t);
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

/// [B, width] ids and validity, each row right-aligned (left padding).
pub fn left_pad(rows: &[Vec<i64>], width: usize, pad: i64, device: Device) -> (Tensor, Tensor) {
    let mut ids = vec![pad; rows.len() * width];
    let mut valid = vec![false; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        let start = r * width + width - row.len();
        ids[start..start + row.len()].copy_from_slice(row);
        valid[start..start + row.len()].fill(true);
    }
    let shape = [rows.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&valid).view(shape).to_device(device).to_kind(Kind::Bool),
    )
}
