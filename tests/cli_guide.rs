//! `iro guide` as a user runs it: explicit folders with a `DIR:BETA` value on the tiny fixtures write one row per
//! prompt with W·K candidates; a bad `DIR:BETA` and a row without `prompt` fail naming what was wrong.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("worker/tests/fixtures").join(name)
}

fn iro_guide(extra: &[&str], prompts: &Path, output: &Path) -> std::process::Output {
    let (policy, v1, v2) = (fixture("llama_gqa_tied"), fixture("llama_seqcls"), fixture("neox_seqcls"));
    let v2 = format!("{}:2", v2.display());
    let mut args = vec![
        "guide",
        "--policy",
        policy.to_str().unwrap(),
        "--value",
        v1.to_str().unwrap(),
        "--value",
        &v2,
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--beams",
        "2",
        "--successors",
        "3",
        "--chunk-length",
        "2",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_iro")).args(&args).output().unwrap()
}

#[test]
fn iro_guide_writes_each_row_with_its_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("in.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Once upon a time\", \"id\": 1}\n{\"prompt\": \"The sea\", \"id\": 2}\n")
        .unwrap();
    let output = dir.path().join("out.jsonl");
    let reward = fixture("neox_seqcls");
    let out = iro_guide(&["--all-candidates", "--reward", reward.to_str().unwrap()], &prompts, &output);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["id"], i + 1);
        assert!(row["output"].is_string() && row["score"].is_number() && row["reward"].is_number(), "{row}");
        assert_eq!(row["candidates"].as_array().unwrap().len(), 6, "W·K = 2·3 candidates");
    }
}

#[test]
fn iro_guide_names_a_bad_beta_and_a_row_without_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("in.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"ok\"}\n{\"question\": \"where is my prompt\"}\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let out = iro_guide(&[], &prompts, &output);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("in.jsonl:2") && err.contains("missing field `prompt`"), "{err}");
    assert!(!output.exists());

    let bad = format!("{}:high", fixture("llama_seqcls").display());
    let out = iro_guide(&["--value", &bad], &prompts, &output);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`high` is not a number"), "{err}");
}
