//! `iro dpo` as a user runs it: string pairs and an UltraFeedback-style row on the tiny fixture train and publish an
//! HF causal-LM folder; the same command again resumes (no new step); a row without `rejected` fails naming the
//! file, the line and the field.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("worker/tests/fixtures").join(name)
}

fn iro_dpo(pairs: &Path, out: &Path) -> std::process::Output {
    let policy = fixture("llama_gqa_tied");
    let args = [
        "dpo",
        "--policy",
        policy.to_str().unwrap(),
        "--pairs",
        pairs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--chat-template",
        "chatml",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--log-format",
        "json",
    ];
    Command::new(env!("CARGO_BIN_EXE_iro")).args(args).output().unwrap()
}

fn checkpoints(out: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn iro_dpo_trains_on_string_and_message_pairs_publishes_a_causal_lm_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    let rows = [
        r#"{"prompt": "The river ran", "chosen": "quietly past the mill", "rejected": "fast"}"#,
        r#"{"prompt": "Every morning he", "chosen": "rowed out", "rejected": "kept a small boat tied"}"#,
        r#"{"prompt": "The miller", "chosen": [{"role": "user", "content": "The miller"}, {"role": "assistant", "content": "kept a boat"}], "rejected": [{"role": "user", "content": "The miller"}, {"role": "assistant", "content": "ran"}]}"#,
    ];
    std::fs::write(&pairs, rows.join("\n") + "\n").unwrap();
    let out = dir.path().join("dpo");
    let run = iro_dpo(&pairs, &out);
    let log = String::from_utf8_lossy(&run.stderr).to_string() + &String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{log}");
    // 3 pairs in batches of 2: 2 steps per epoch, 4 in all.
    let found = checkpoints(&out);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with("checkpoint-00000004"), "{found:?}");
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(found[0].join(name).exists(), "{name} missing");
    }
    assert!(log.contains("DPO done") && log.contains("\"steps\":4"), "{log}");
    let before = std::fs::read(found[0].join("model.safetensors")).unwrap();

    // Again: resumes from step 4 of 4, trains nothing and leaves the policy as it was.
    let again = iro_dpo(&pairs, &out);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(checkpoints(&out), found);
    assert_eq!(std::fs::read(found[0].join("model.safetensors")).unwrap(), before);

    // A row without `rejected` is named.
    std::fs::write(&pairs, r#"{"prompt": "x", "chosen": "y"}"#.to_owned() + "\n").unwrap();
    let bad = iro_dpo(&pairs, &dir.path().join("bad"));
    let err = String::from_utf8_lossy(&bad.stderr).to_string() + &String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(err.contains("pairs.jsonl") && err.contains("rejected"), "{err}");
}
