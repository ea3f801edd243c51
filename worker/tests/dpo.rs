//! The DPO loss against TRL's `DPOTrainer` (issue 15): `fixtures/dpo_pairs` holds the batch TRL built for two
//! preference pairs, its loss and every policy parameter's gradient (scripts/fixtures/make_dpo_reference.py: the
//! policy a perturbed llama_gqa_tied, the reference llama_gqa_tied, β = 0.05, float32).

#[path = "support/dpo_pairs.rs"]
mod dpo_pairs;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use iro_worker::generate::sampler::SamplingParams;
use iro_worker::generate::{GenerateOptions, generate};
use iro_worker::model::Checkpoint;
use iro_worker::model::heads::CausalLm;
use iro_worker::train::dpo::{completion_logps, dpo_sigmoid_loss, pair_batch, train_dpo};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn dpo_loss_and_gradients_equal_trls_dpo_trainer() {
    let dir = fixture("dpo_pairs");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let beta = meta["beta"].as_f64().unwrap();
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect();
    let ids = &reference["input_ids"];
    let valid = reference["attention_mask"].to_kind(Kind::Bool);
    let completion = reference["completion_mask"].to_kind(Kind::Bool);
    let pairs = ids.size()[0] / 2;

    let frozen = CausalLm::load(&fixture("llama_gqa_tied"), Kind::Float, Device::Cpu).unwrap();
    let ref_logps = tch::no_grad(|| completion_logps(&frozen, ids, &valid, &completion));
    let ck = Checkpoint::load_trainable(&dir.join("policy"), Kind::Float, Device::Cpu).unwrap();
    let params: Vec<(String, Tensor)> =
        ck.weights.tensors().map(|(n, t)| (n.to_owned(), t.shallow_clone().set_requires_grad(true))).collect();
    let policy = CausalLm::from_checkpoint(&ck).unwrap();
    let logps = completion_logps(&policy, ids, &valid, &completion);
    let (chosen, rejected) = (logps.narrow(0, 0, pairs), logps.narrow(0, pairs, pairs));
    let (ref_chosen, ref_rejected) = (ref_logps.narrow(0, 0, pairs), ref_logps.narrow(0, pairs, pairs));
    let loss = dpo_sigmoid_loss(&chosen, &rejected, &ref_chosen, &ref_rejected, beta);
    let want = reference["loss"].double_value(&[0]);
    let got = loss.double_value(&[]);
    assert!((got - want).abs() <= 1e-5, "DPO loss {got}, TRL {want}");
    assert!((want - std::f64::consts::LN_2).abs() > 1e-2, "the fixture's policy must differ from its reference");
    loss.backward();
    let mut checked = 0;
    for (name, p) in &params {
        let Some(want) = reference.get(&format!("grad.{name}")) else { continue };
        let grad = p.grad();
        let err = (&grad - want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(err <= 1e-5 + 1e-4 * scale, "{name}: gradient off by {err} (largest entry {scale})");
        checked += 1;
    }
    let expected = reference.keys().filter(|k| k.starts_with("grad.")).count();
    eprintln!("DPO loss {got:.6} (TRL {want:.6}); {checked} parameter gradients match");
    assert_eq!(checked, expected, "every parameter TRL differentiates has a gradient here");
}

fn weights(dir: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn dpo_training_lowers_the_loss_publishes_a_causal_lm_and_resumes_to_the_same_weights() {
    let base = fixture("llama_gqa_tied");
    let data = dpo_pairs::pairs(6);
    let whole = tempfile::tempdir().unwrap();
    let report =
        train_dpo(&dpo_pairs::config(0), &data, &base, whole.path(), false, |_, _, _| ControlFlow::Continue(()))
            .unwrap();
    // 6 pairs in batches of 4: 2 steps per epoch. The policy starts as its reference: the first loss is log 2.
    assert_eq!((report.steps, report.total_steps), (6, 6));
    assert!((report.losses[0] - std::f64::consts::LN_2).abs() < 1e-6, "{:?}", report.losses);
    assert!(report.final_loss < report.losses[0] - 0.05, "DPO did not lower its loss: {:?}", report.losses);

    // The published folder is the base checkpoint's layout with new weights, and loads as a causal LM.
    let (trained, original) = (weights(&report.checkpoint), weights(&base));
    let layout =
        |w: &[(String, Tensor)]| -> Vec<(String, Vec<i64>)> { w.iter().map(|(n, t)| (n.clone(), t.size())).collect() };
    assert_eq!(layout(&trained), layout(&original));
    assert!(trained.iter().zip(&original).any(|((_, a), (_, b))| a != b), "the weights did not move");
    for name in ["config.json", "tokenizer.json"] {
        assert!(report.checkpoint.join(name).exists(), "{name} missing from the published policy");
    }
    let lm = CausalLm::load(&report.checkpoint, Kind::Float, Device::Cpu).unwrap();
    let (ids, valid, completion) = pair_batch(&data.iter().collect::<Vec<_>>(), 3, Device::Cpu);
    let after = tch::no_grad(|| completion_logps(&lm, &ids, &valid, &completion));
    let k = data.len() as i64;
    let before = tch::no_grad(|| {
        completion_logps(&CausalLm::load(&base, Kind::Float, Device::Cpu).unwrap(), &ids, &valid, &completion)
    });
    let margin = |l: &Tensor| (l.narrow(0, 0, k) - l.narrow(0, k, k)).mean(Kind::Float).double_value(&[]);
    assert!(margin(&after) > margin(&before), "chosen-over-rejected margin {} → {}", margin(&before), margin(&after));

    // Killed after step 3 (checkpoints every step), then resumed: the same final weights, bit for bit.
    let split = tempfile::tempdir().unwrap();
    let stopped = train_dpo(&dpo_pairs::config(1), &data, &base, split.path(), false, |step, _, _| {
        if step == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })
    .unwrap();
    assert_eq!(stopped.steps, 3);
    let resumed =
        train_dpo(&dpo_pairs::config(1), &data, &base, split.path(), true, |_, _, _| ControlFlow::Continue(()))
            .unwrap();
    assert_eq!(resumed.steps, 6);
    assert_eq!(resumed.losses, report.losses, "a resumed DPO run took other steps");
    for ((n, a), (_, b)) in weights(&resumed.checkpoint).iter().zip(&trained) {
        assert_eq!(a, b, "{n} differs after a resume");
    }
}

/// A DPO-trained policy as the trainer publishes it is a causal-LM folder transformers reads: `dpo_policy` was
/// written by this trainer (`examples/dpo_policy_fixture.rs`) and greedy-decoded by transformers'
/// `AutoModelForCausalLM` (`scripts/fixtures/make_dpo_policy_reference.py`); iro's greedy decoding of the folder
/// must give the same tokens, and a fresh training the same layout.
#[test]
fn a_dpo_policy_loads_in_transformers_and_decodes_greedily_as_iro_does() {
    let folder = fixture("dpo_policy");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap()).unwrap();
    assert_eq!(reference["class"], "LlamaForCausalLM", "{reference}");
    let ids = |v: &serde_json::Value| -> Vec<Vec<i64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect())
            .collect()
    };
    let (prompts, want) = (ids(&reference["prompts"]), ids(&reference["greedy"]));
    let lm = CausalLm::load(&folder, Kind::Float, Device::Cpu).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: want[0].len(),
        sampling: SamplingParams::GREEDY,
        eos_token_ids: vec![],
        pad_token_id: 3,
    };
    let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
    let got = generate(&lm, &prompts, &seeds, &opts).unwrap();
    for ((g, w), p) in got.iter().zip(&want).zip(&prompts) {
        assert_eq!(&g.tokens, w, "prompt {p:?}: iro's greedy tokens differ from transformers'");
    }

    let out = tempfile::tempdir().unwrap();
    let report = train_dpo(
        &dpo_pairs::config(0),
        &dpo_pairs::pairs(6),
        &fixture("llama_gqa_tied"),
        out.path(),
        false,
        |_, _, _| ControlFlow::Continue(()),
    )
    .unwrap();
    let layout = |dir: &Path| -> Vec<(String, Vec<i64>, Kind)> {
        weights(dir).into_iter().map(|(n, t)| (n, t.size(), t.kind())).collect()
    };
    assert_eq!(layout(&report.checkpoint), layout(&folder), "DPO publishes another tensor layout");
    let config = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(&report.checkpoint), config(&folder), "DPO publishes another config.json");
}

/// Two ranks over the TCP ring, each taking every other micro-batch, end where one rank ends: 7 pairs in batches of
/// 4 (micro-batches of 1) make the last batch of each epoch uneven between the ranks.
#[test]
fn two_rank_dpo_ends_with_one_ranks_weights() {
    use iro_worker::collective::TcpRing;
    use iro_worker::collective::tcp_ring::RingOptions;
    use iro_worker::train::DataParallel;
    use iro_worker::train::dpo::train_dpo_ranked;

    let base = fixture("llama_gqa_tied");
    let data = dpo_pairs::pairs(7);
    let mut config = dpo_pairs::config(0);
    config.micro_batch_size = 1;
    let one = tempfile::tempdir().unwrap();
    let single = train_dpo(&config, &data, &base, one.path(), false, |_, _, _| ControlFlow::Continue(())).unwrap();

    let listeners: Vec<_> = (0..2).map(|_| TcpRing::bind("127.0.0.1:0").unwrap()).collect();
    let endpoints: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let outs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (endpoints, data, config, base, out) =
                    (endpoints.clone(), &data, &config, &base, outs[rank].path());
                s.spawn(move || {
                    let opts = RingOptions { deadline: std::time::Duration::from_secs(30), segment_bytes: 1 << 16 };
                    let mut ring = TcpRing::connect(rank, endpoints, l, opts).unwrap();
                    let gang = DataParallel { collective: &mut ring, bucket_bytes: 1 << 16 };
                    train_dpo_ranked(config, data, base, out, false, gang, |_, _, _| ControlFlow::Continue(())).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(reports[0].steps, single.steps);
    for (a, b) in reports[0].losses.iter().zip(&single.losses) {
        assert!((a - b).abs() <= 1e-5, "gang loss {a}, one rank {b}");
    }
    let worst = weights(&reports[0].checkpoint)
        .iter()
        .zip(weights(&single.checkpoint))
        .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    eprintln!("2-rank DPO vs one rank: max-abs weight difference {worst:.2e}");
    assert!(worst <= 1e-5, "2-rank DPO ends {worst} away from one rank");
}
