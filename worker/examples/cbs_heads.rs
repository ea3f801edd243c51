//! CBS guided by `head`-kind value functions on SmolLM2-135M-Instruct, scored two ways: the heads reading the
//! policy decoder's own hidden states (`PolicyHeadEnsemble`, what the pipeline uses) against the previous way, a
//! KV-cached forward pass of the shared backbone per value function and chunk (`CachedValueEnsemble`). Both
//! searches use the same seeds and must return the same rows; the wall times and their ratio are printed for
//! ensembles of 1 and 2 heads (iterations 2 and 3 of IRO). Fresh random heads: only the cost matters here.
//! `cargo run --release -p iro-worker --example cbs_heads [MODEL_DIR]`

use std::time::Instant;

use iro_common::config::PromptFormat;
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::model::heads::{Head, MlpHead};
use iro_worker::model::{CausalLm, ScalarModel};
use iro_worker::search::{CachedValueEnsemble, CbsParams, PolicyHeadEnsemble, PrefixScorer, chunk_beam_search};
use iro_worker::text::{Tokenizer, prompt};
use tch::{Device, Kind};

const PROMPTS: [&str; 4] = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue to a ten year old child.",
    "List five uses of a paperclip.",
    "What is the difference between weather and climate?",
];

fn main() {
    tch::set_num_threads(2);
    let dir = std::env::args().nth(1).unwrap_or_else(|| "assets/smollm2-135m-instruct".into());
    let lm = CausalLm::load(dir.as_ref(), Kind::Float, Device::Cpu).expect("load the policy");
    let tokenizer = Tokenizer::load(dir.as_ref()).expect("load the tokenizer");
    let prompts: Vec<Vec<i64>> = PROMPTS
        .iter()
        .map(|p| tokenizer.encode(&prompt::chat_prompt(PromptFormat::Chatml, p, None).unwrap(), false).unwrap())
        .collect();
    let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
    let eos = lm.config.eos_token_ids.clone();
    let params = CbsParams {
        beams: 2,
        successors: 2,
        chunk_len: 8,
        sampling: SamplingParams { temperature: 0.7, top_k: 50, top_p: 1.0 },
        max_new_tokens: 48,
        eos_token_ids: eos.clone(),
        pad_token_id: lm.config.pad_token_id.unwrap_or(0),
    };
    let h = lm.config.hidden_size();
    let heads: Vec<ScalarModel> = (0..2)
        .map(|seed| ScalarModel {
            config: lm.config.clone(),
            backbone: lm.backbone.clone(),
            head: Head::Mlp(MlpHead::new(h, 256, seed, Device::Cpu)),
            depth: None,
            pooling: iro_common::config::ValuePooling::Last,
        })
        .collect();
    let timed = |scorer: &mut dyn PrefixScorer| {
        let start = Instant::now();
        let out = chunk_beam_search(&lm, &prompts, &seeds, &params, scorer).expect("search").candidates;
        (start.elapsed().as_secs_f64(), out)
    };
    println!(
        "CBS W=2 K=2 L=8, {} tokens, {} prompts ({} rows), f32, 2 threads; best of 2 alternating rounds",
        params.max_new_tokens,
        prompts.len(),
        prompts.len() * 4
    );
    for n in [1usize, 2] {
        let members = || heads.iter().take(n).map(|m| (m, 1.0)).collect::<Vec<_>>();
        let (mut fast, mut slow) = (f64::MAX, f64::MAX);
        for _ in 0..2 {
            let mut shared = PolicyHeadEnsemble::new(&lm, members(), eos.clone()).unwrap();
            let (t_fast, a) = timed(&mut shared);
            let mut cached = CachedValueEnsemble::new(members(), eos.clone(), params.max_new_tokens + 1).unwrap();
            let (t_slow, b) = timed(&mut cached);
            let same = a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| x.generation == y.generation);
            assert!(same, "the two scorers steered the search apart");
            fast = fast.min(t_fast);
            slow = slow.min(t_slow);
        }
        println!(
            "{n} head(s): decoder's hidden states {fast:.2} s | own cached forward {slow:.2} s | {:.2}× faster",
            slow / fast
        );
    }
}
