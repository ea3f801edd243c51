//! Cache-consistency of batched decoding: feeding tokens through the KV cache one at a time, and
//! reordering/replicating cached rows (what guided search does), must give the same logits as
//! recomputing the whole sequences from scratch.

use std::path::{Path, PathBuf};

use iro_worker::generate::left_pad;
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::generate::{GenerateOptions, generate};
use iro_worker::model::{CausalLm, positions_from_valid};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

const PROMPTS: [&[i64]; 3] = [&[5, 17, 42, 99, 100, 7, 8], &[300, 301, 9, 12], &[44, 45, 46, 47, 48, 49, 50, 51, 52]];

/// Logits of the last position of each row, recomputed from scratch (no cache), for full sequences.
fn full_last_logits(lm: &CausalLm, seqs: &[Vec<i64>]) -> Tensor {
    let width = seqs.iter().map(Vec::len).max().unwrap();
    let (ids, valid) = left_pad(seqs, width, 3, Device::Cpu);
    let logits = lm.forward(&ids, &valid, &positions_from_valid(&valid), None);
    logits.select(1, -1)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn incremental_decoding_with_the_cache_equals_recomputation_and_reorder_too() {
    for name in ["llama_gqa_tied", "neox_parallel"] {
        let lm = CausalLm::load(&fixture(name), Kind::Float, Device::Cpu).unwrap();
        let _g = tch::no_grad_guard();
        let mut seqs: Vec<Vec<i64>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
        let width = seqs.iter().map(Vec::len).max().unwrap();
        let (ids, valid) = left_pad(&seqs, width, 3, Device::Cpu);
        let positions = positions_from_valid(&valid);
        let mut cache = lm.backbone.new_cache(3, (width + 8) as i64);
        let mut last = lm.forward(&ids, &valid, &positions, Some(&mut cache)).select(1, -1);
        let mut next_pos = positions.select(1, -1) + 1;
        let feed = [[11i64, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]];
        for (step, tokens) in feed.iter().enumerate() {
            assert!(max_abs(&last, &full_last_logits(&lm, &seqs)) < 1e-4, "{name}: step {step} before feeding");
            if step == 2 {
                // Guided search keeps rows 2, 0, 0: replicate row 0, drop row 1.
                let index = [2i64, 0, 0];
                cache.reorder(&Tensor::from_slice(&index));
                last = last.index_select(0, &Tensor::from_slice(&index));
                next_pos = next_pos.index_select(0, &Tensor::from_slice(&index));
                seqs = index.iter().map(|&i| seqs[i as usize].clone()).collect();
                assert!(max_abs(&last, &full_last_logits(&lm, &seqs)) < 1e-4, "{name}: right after reorder");
            }
            for (s, &t) in seqs.iter_mut().zip(tokens) {
                s.push(t);
            }
            let ids = Tensor::from_slice(tokens).unsqueeze(1);
            let valid = Tensor::from_slice(&[true, true, true]).unsqueeze(1);
            last = lm.forward(&ids, &valid, &next_pos.unsqueeze(1), Some(&mut cache)).select(1, 0);
            next_pos += 1;
        }
        assert!(max_abs(&last, &full_last_logits(&lm, &seqs)) < 1e-4, "{name}: after the last step");
    }
}

#[test]
fn sampling_is_reproducible_per_row_whatever_the_batch() {
    let lm = CausalLm::load(&fixture("neox_parallel"), Kind::Float, Device::Cpu).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 10,
        sampling: SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.95 },
        eos_token_ids: vec![],
        pad_token_id: 3,
    };
    let all: Vec<Vec<i64>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let together = generate(&lm, &all, &[7, 8, 9], &opts).unwrap();
    let alone = generate(&lm, &all[1..2], &[8], &opts).unwrap();
    assert_eq!(together[1].tokens, alone[0].tokens);
    let again = generate(&lm, &all, &[7, 8, 9], &opts).unwrap();
    assert_eq!(together, again);
    let other_seed = generate(&lm, &all, &[70, 80, 90], &opts).unwrap();
    assert_ne!(together, other_seed);
    // Log-probs are of the unmodified distribution: negative, and consistent with a recomputation.
    let full = {
        let mut seq = all[1].clone();
        seq.extend(&together[1].tokens[..3]);
        let lp = full_last_logits(&lm, &[seq[..seq.len() - 1].to_vec()]).log_softmax(-1, Kind::Float);
        lp.double_value(&[0, together[1].tokens[2]])
    };
    assert!((full - together[1].logprobs[2] as f64).abs() < 1e-4);
}

#[test]
fn bf16_and_f16_weights_stay_close_to_f32() {
    let dir = fixture("neox_parallel");
    let _g = tch::no_grad_guard();
    let seqs: Vec<Vec<i64>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let reference = full_last_logits(&CausalLm::load(&dir, Kind::Float, Device::Cpu).unwrap(), &seqs);
    let scale = reference.abs().max().double_value(&[]);
    for kind in [Kind::BFloat16, Kind::Half] {
        let lm = CausalLm::load(&dir, kind, Device::Cpu).unwrap();
        let got = full_last_logits(&lm, &seqs).to_kind(Kind::Float);
        assert_eq!(got.size(), reference.size());
        // bf16 keeps 8 bits of mantissa: a few percent of the logit range is the expected error.
        let err = max_abs(&got, &reference);
        assert!(err < 0.05 * scale.max(1.0), "{kind:?}: max-abs {err} vs logit scale {scale}");
    }
}
