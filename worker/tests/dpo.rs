//! The DPO loss against TRL's `DPOTrainer` (issue 15): `fixtures/dpo_pairs` holds the batch TRL built for two
//! preference pairs, its loss and every policy parameter's gradient (scripts/fixtures/make_dpo_reference.py: the
//! policy a perturbed llama_gqa_tied, the reference llama_gqa_tied, β = 0.05, float32).

use std::path::{Path, PathBuf};

use iro_worker::model::Checkpoint;
use iro_worker::model::heads::CausalLm;
use iro_worker::train::dpo::{completion_logps, dpo_sigmoid_loss};
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
