//! Which prompts each task works on, and how the policy sees them. Every worker derives the same answer from
//! the run config alone: rollout iteration t takes slice t of one seeded shuffle of the training prompts
//! (disjoint across iterations), evaluation takes the held-out test prompts, and shard s of a phase is
//! positions `s·shard_size ..` of that list. When training and test prompts come from the same file, the test
//! prompts are set aside first (the tail of a seeded shuffle), so no rollout ever trains on a test prompt.

use iro_common::RunConfig;
use iro_common::config::PromptFormat;
use iro_common::data::{self, Example, Prompt, iteration_slice, shuffled_order};

use crate::error::{Error, Result};
use crate::generate::sampler::row_seed;
use crate::text::{Tokenizer, prompt};

/// Salts that give rollouts and evaluation independent seed streams.
const SPLIT_SALT: u64 = 0x07E5_75E7_0000_0001;
const ROLLOUT_SALT: u64 = 0x0007_0110_u64 << 32;
const EVAL_SALT: u64 = 0xE7A1_u64 << 40;

/// The training and test prompts of a run.
pub struct RunData {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// Indices into `train` that rollouts may use.
    pool: Vec<usize>,
    /// Indices into `test`, in evaluation order.
    test_order: Vec<usize>,
}

/// One prompt as a task uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    pub id: String,
    /// What people read: AlpacaEval's instruction, or the formatted TL;DR prompt. It is also the raw prompt a
    /// reward model with a chat template of its own formats (`reward.prompt_format`).
    pub display: String,
    pub dataset: Option<String>,
    /// The prompt as the policy sees it (task formatter or chat template applied).
    pub text: String,
    /// `text` in the policy's tokenizer.
    pub ids: Vec<i64>,
    pub reference: Option<String>,
    /// Sampling seed of this prompt: depends on the run seed, the phase (and iteration, for rollouts) and the
    /// prompt's position in its file, never on sharding or batching.
    pub seed: u64,
}

impl RunData {
    pub fn load(config: &RunConfig) -> Result<Self> {
        let d = &config.data;
        let train = data::load(d.format, &d.train)?;
        let same_file = d.test == d.train || d.test.as_os_str().is_empty();
        let (test, pool, test_order) = if same_file {
            // Hold out the tail of a seeded shuffle for testing; rollouts draw from the rest.
            let n = train.len();
            if d.test_prompts > n {
                return Err(Error::InvalidRequest(format!(
                    "data.test_prompts = {} but {} holds only {n} prompts",
                    d.test_prompts,
                    d.train.display()
                )));
            }
            let order = shuffled_order(n, config.run.seed ^ SPLIT_SALT);
            let (pool, held) = order.split_at(n - d.test_prompts);
            (train.clone(), pool.to_vec(), held.to_vec())
        } else {
            let test = data::load(d.format, &d.test)?;
            if d.test_prompts > test.len() {
                return Err(Error::InvalidRequest(format!(
                    "data.test_prompts = {} but {} holds only {} prompts",
                    d.test_prompts,
                    d.test.display(),
                    test.len()
                )));
            }
            let pool = (0..train.len()).collect();
            (test, pool, (0..d.test_prompts).collect())
        };
        Ok(Self { train, test, pool, test_order })
    }

    /// Training-file indices of iteration `t`'s rollout prompts.
    pub fn rollout_prompts(&self, config: &RunConfig, t: u32) -> Result<Vec<usize>> {
        let k = config.data.prompts_per_iteration;
        let slice = iteration_slice(self.pool.len(), config.run.seed, t, k)?;
        Ok(slice.into_iter().map(|i| self.pool[i]).collect())
    }

    /// Test-file indices of the evaluation prompts.
    pub fn test_prompts(&self) -> &[usize] {
        &self.test_order
    }
}

/// Positions `shard·size .. (shard+1)·size` of `list` (the last shard may be short).
pub fn shard_of(list: &[usize], shard: u32, size: usize) -> Result<&[usize]> {
    let start = shard as usize * size;
    if start >= list.len() {
        return Err(Error::InvalidRequest(format!(
            "shard {shard} starts at prompt {start}, past the phase's {} prompts",
            list.len()
        )));
    }
    Ok(&list[start..(start + size).min(list.len())])
}

/// The seed stream of a phase: rollouts get a fresh one per iteration; evaluation uses one for every
/// iteration and method, so all of them answer a test prompt with the same random numbers (comparisons between
/// iterations and baselines then differ by the method, not by luck).
pub fn phase_seed(run_seed: u64, rollout_iteration: Option<u32>) -> u64 {
    match rollout_iteration {
        Some(t) => run_seed ^ ROLLOUT_SALT ^ u64::from(t),
        None => run_seed ^ EVAL_SALT,
    }
}

/// Formats and tokenises `examples[i]` for each index, with the policy's one prompt formatter.
pub fn prompt_items(
    examples: &[Example],
    indices: &[usize],
    format: PromptFormat,
    max_prompt_tokens: usize,
    tokenizer: &Tokenizer,
    seed: u64,
) -> Result<Vec<PromptItem>> {
    let add_special = !prompt::has_special_tokens(format);
    indices
        .iter()
        .map(|&i| {
            let e = &examples[i];
            let (display, text, dataset) = match &e.prompt {
                Prompt::Tldr { subreddit, title, post } => {
                    if format != PromptFormat::Tldr {
                        return Err(Error::InvalidRequest(format!(
                            "prompt {}: TL;DR records need policy.prompt_format = \"tldr\", not {format:?}",
                            e.id
                        )));
                    }
                    let p = prompt::TldrPost { subreddit, title, post };
                    let text = prompt::tldr_prompt(&p, tokenizer, max_prompt_tokens)?;
                    (text.clone(), text, None)
                }
                Prompt::Instruction { instruction, dataset } => {
                    (instruction.clone(), prompt::chat_prompt(format, instruction, None)?, dataset.clone())
                }
                Prompt::Plain { prompt: p, .. } => (p.clone(), prompt::chat_prompt(format, p, None)?, None),
            };
            let ids = tokenizer.encode(&text, add_special)?;
            Ok(PromptItem {
                id: e.id.clone(),
                display,
                dataset,
                text,
                ids,
                reference: e.reference.clone(),
                seed: row_seed(seed, i as u64),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_list_once() {
        let list: Vec<usize> = (0..10).collect();
        let mut seen = Vec::new();
        for s in 0..3 {
            seen.extend_from_slice(shard_of(&list, s, 4).unwrap());
        }
        assert_eq!(seen, list);
        assert_eq!(shard_of(&list, 3, 4).unwrap_err().kind(), "invalid_request");
    }

    #[test]
    fn evaluation_seeds_do_not_depend_on_the_iteration() {
        assert_eq!(phase_seed(7, None), phase_seed(7, None));
        assert_ne!(phase_seed(7, Some(1)), phase_seed(7, Some(2)));
        assert_ne!(phase_seed(7, Some(1)), phase_seed(7, None));
    }
}
