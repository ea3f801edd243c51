//! `iro guide` (the paper's `run_guiding` step) on the tiny fixtures: a prompt's guided answer does not depend on
//! the batch it ran in, output rows keep the input's fields and gain the answer (and, on request, all W·K
//! candidates), head-kind values are recognised by their tensors, a run's published V_1..V_t guide as the same
//! folders named by hand, and bad input is refused naming the file, line, field or folder.

#[path = "support/tiny_run.rs"]
mod tiny_run;

use std::path::{Path, PathBuf};

use iro_common::config::{PromptFormat, ValueKind};
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::jobs::Placement;
use iro_worker::jobs::guide::{self, GuideJob, ValueSpec};
use iro_worker::model::heads::MlpHead;
use iro_worker::search::FinalPick;
use serde_json::{Value, json};
use tiny_run::fixture;

const PROMPTS: [&str; 6] = [
    "The cat sat on the mat and",
    "Once upon a time",
    "Write a short note about the weather in the hills today, please.",
    "Hi",
    "A list of three fruits:",
    "Tell me a story about a dragon who could not fly, and what it did instead.",
];

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        })
        .collect()
}

/// Prompts with extra fields of several JSON types, which the output must keep.
fn prompt_rows() -> Vec<Value> {
    PROMPTS.iter().enumerate().map(|(i, p)| json!({"id": format!("p{i}"), "prompt": p, "meta": {"n": i}})).collect()
}

/// The tiny policy guided by two model-kind values (V_2 with beta 2), W = K = 2, L = 3.
fn job(dir: &Path, prompts: PathBuf, name: &str) -> GuideJob {
    GuideJob {
        policy: fixture("llama_gqa_tied"),
        values: vec![
            ValueSpec { dir: fixture("llama_seqcls"), beta: 1.0 },
            ValueSpec { dir: fixture("neox_seqcls"), beta: 2.0 },
        ],
        reward: None,
        prompts,
        output: dir.join(name),
        beams: 2,
        successors: 2,
        chunk_len: 3,
        max_new_tokens: 8,
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 },
        final_pick: FinalPick::ValueArgmax,
        seed: 5,
        prompt_format: PromptFormat::Raw,
        max_prompt_tokens: 512,
        placement: Placement { device: "cpu".into(), dtype: "f32".into() },
        batch_size: 1,
        all_candidates: false,
    }
}

fn run(job: &GuideJob) -> Vec<serde_json::Map<String, Value>> {
    let mut seen = Vec::new();
    guide::run(job, &mut |done, total| seen.push((done, total))).unwrap();
    let rows = read_jsonl(&job.output);
    assert_eq!(seen.first(), Some(&(0, rows.len())), "progress starts at 0 of every row");
    assert_eq!(seen.last(), Some(&(rows.len(), rows.len())), "progress ends at every row");
    rows
}

fn close(a: &Value, b: &Value) -> bool {
    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-4
}

/// Same answer, same token ids, scores (and rewards) within 1e-4, candidate by candidate when present.
fn same_answer(a: &serde_json::Map<String, Value>, b: &serde_json::Map<String, Value>, what: &str) {
    assert_eq!(a["output"], b["output"], "{what}: output");
    assert_eq!(a["token_ids"], b["token_ids"], "{what}: token ids");
    assert!(close(&a["score"], &b["score"]), "{what}: score {} vs {}", a["score"], b["score"]);
    if let Some(r) = a.get("reward") {
        assert!(close(r, &b["reward"]), "{what}: reward {r} vs {}", b["reward"]);
    }
    if let Some(Value::Array(ca)) = a.get("candidates") {
        let cb = b["candidates"].as_array().unwrap();
        assert_eq!(ca.len(), cb.len(), "{what}: candidates");
        for (j, (x, y)) in ca.iter().zip(cb).enumerate() {
            same_answer(x.as_object().unwrap(), y.as_object().unwrap(), &format!("{what}, candidate {j}"));
        }
    }
}

#[test]
fn a_prompts_guided_answer_does_not_depend_on_the_batch_it_ran_in() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &prompt_rows());
    for final_pick in [FinalPick::ValueArgmax, FinalPick::RewardArgmax] {
        let mut one = job(dir.path(), prompts.clone(), "one.jsonl");
        one.final_pick = final_pick;
        one.reward = Some(fixture("neox_seqcls"));
        one.all_candidates = true;
        let mut eight = one.clone();
        eight.batch_size = 8;
        eight.output = dir.path().join("eight.jsonl");
        let (a, b) = (run(&one), run(&eight));
        assert_eq!(a.len(), PROMPTS.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x["id"], json!(format!("p{i}")), "rows keep the input order");
            same_answer(x, y, &format!("{final_pick:?}, row {i}"));
        }
        // Rows differ from each other: the comparison above compared real searches, not one repeated answer.
        let distinct: std::collections::HashSet<String> = a.iter().map(|r| r["token_ids"].to_string()).collect();
        assert!(distinct.len() > 1);
        // The reward picked when asked, and only then.
        assert_eq!(a[0].contains_key("reward"), final_pick == FinalPick::RewardArgmax);
    }
}

#[test]
fn output_rows_keep_the_input_fields_and_all_candidates_lists_w_times_k_rows() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &prompt_rows());
    let mut all = job(dir.path(), prompts.clone(), "all.jsonl");
    all.all_candidates = true;
    all.batch_size = 4;
    let rows = run(&all);
    let tokenizer = iro_worker::text::Tokenizer::load(&fixture("llama_gqa_tied")).unwrap();
    for (i, (row, input)) in rows.iter().zip(prompt_rows()).enumerate() {
        for (k, v) in input.as_object().unwrap() {
            assert_eq!(&row[k], v, "row {i}: input field `{k}`");
        }
        let cands = row["candidates"].as_array().unwrap();
        assert_eq!(cands.len(), all.beams * all.successors, "row {i}: W·K candidates");
        // value_argmax: the answer is the candidate of the highest guiding score (the first of equals).
        let scores: Vec<f64> = cands.iter().map(|c| c["score"].as_f64().unwrap()).collect();
        let best = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let first_best = scores.iter().position(|&s| s == best).unwrap();
        assert_eq!(row["token_ids"], cands[first_best]["token_ids"], "row {i}");
        assert_eq!(row["score"], json!(best), "row {i}");
        for c in cands {
            let ids: Vec<i64> = serde_json::from_value(c["token_ids"].clone()).unwrap();
            assert!(!ids.is_empty() && ids.len() <= all.max_new_tokens, "row {i}: {} tokens", ids.len());
            assert_eq!(c["output"], json!(tokenizer.decode(&ids, true).unwrap()));
        }
    }
    // Without --all-candidates the same answers, and no candidate list.
    let mut plain = job(dir.path(), prompts, "plain.jsonl");
    plain.batch_size = 3;
    for (i, (p, a)) in run(&plain).iter().zip(&rows).enumerate() {
        assert!(!p.contains_key("candidates"));
        same_answer(p, a, &format!("row {i}"));
    }
}

#[test]
fn the_guiding_score_weighs_each_value_by_its_beta() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &prompt_rows()[..2]);
    let base = job(dir.path(), prompts, "a.jsonl");
    let mut first = base.clone();
    first.final_pick = FinalPick::First;
    let mut halved = first.clone();
    halved.values.iter_mut().for_each(|v| v.beta *= 2.0);
    halved.output = dir.path().join("b.jsonl");
    // Halving every value scales every score by 1/2, so the search ranks alike and returns the same rows.
    let (a, b) = (run(&first), run(&halved));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["token_ids"], y["token_ids"]);
        let (sx, sy) = (x["score"].as_f64().unwrap(), y["score"].as_f64().unwrap());
        assert!((sx - 2.0 * sy).abs() <= 1e-4, "{sx} vs 2 × {sy}");
        assert!(sx.abs() > 1e-3, "a zero score would make this test vacuous");
    }
}

/// A head-kind value folder as value training writes it: the four `value_head.*` tensors and a small config.
fn write_head(dir: &Path, hidden: i64, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let head = MlpHead::new(hidden, 16, seed, tch::Device::Cpu);
    tch::Tensor::write_safetensors(&head.named(), dir.join("model.safetensors")).unwrap();
    let config = json!({"iro_value_kind": "head", "hidden_size": hidden, "head_width": 16});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn head_kind_values_are_recognised_by_their_tensors_and_must_fit_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    write_jsonl(&prompts, &prompt_rows());
    let (h1, h2) = (dir.path().join("h1"), dir.path().join("h2"));
    write_head(&h1, 48, 1);
    write_head(&h2, 48, 2);
    let mut heads = job(dir.path(), prompts.clone(), "heads.jsonl");
    heads.values = vec![ValueSpec { dir: h1.clone(), beta: 1.0 }, ValueSpec { dir: h2.clone(), beta: 2.5 }];
    heads.all_candidates = true;
    let mut batched = heads.clone();
    batched.batch_size = 8;
    batched.output = dir.path().join("heads8.jsonl");
    let (a, b) = (run(&heads), run(&batched));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        same_answer(x, y, &format!("heads, row {i}"));
    }
    // Other values steer the search elsewhere: the heads really guided it.
    let models = run(&job(dir.path(), prompts.clone(), "models.jsonl"));
    assert!(a.iter().zip(&models).any(|(h, m)| h["token_ids"] != m["token_ids"]));

    // A head trained on another policy's hidden states (width 32, the policy has 48) is refused.
    let narrow = dir.path().join("narrow");
    write_head(&narrow, 32, 3);
    let mut wrong = heads.clone();
    wrong.values = vec![ValueSpec { dir: narrow.clone(), beta: 1.0 }];
    let err = guide::run(&wrong, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("narrow") && err.contains("width 32") && err.contains("48"), "{err}");
    // One ensemble is of one kind.
    wrong.values = vec![ValueSpec { dir: h1, beta: 1.0 }, ValueSpec { dir: fixture("llama_seqcls"), beta: 1.0 }];
    let err = guide::run(&wrong, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("head-kind") && err.contains("model-kind"), "{err}");
}

#[test]
fn a_runs_published_values_guide_as_the_same_folders_named_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut config = tiny_run::tiny_run("guided", &store.display().to_string(), 2);
    config.value.kind = ValueKind::Head;
    config.value.betas = vec![1.0, 3.0];
    // V_1 and V_2 as the pipeline publishes them.
    for t in 1..=2u32 {
        let head = dir.path().join(format!("head-{t}"));
        write_head(&head, 48, 10 + u64::from(t));
        guide::publish_value_folder(&config, t, &head).unwrap();
    }
    // TL;DR rows (formatted as the run's training prompts are) and a ready-made prompt.
    let posts = std::fs::read_to_string(&config.data.test).unwrap();
    let mut rows: Vec<Value> = posts.lines().take(3).map(|l| serde_json::from_str(l).unwrap()).collect();
    rows.push(json!({"prompt": "SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"}));
    let prompts = dir.path().join("posts.jsonl");
    write_jsonl(&prompts, &rows);

    let mut from_run = GuideJob::from_run(&config, prompts.clone(), dir.path().join("run.jsonl"));
    assert_eq!((from_run.beams, from_run.successors, from_run.chunk_len), (2, 2, 3));
    assert_eq!(from_run.prompt_format, PromptFormat::Tldr);
    assert_eq!(from_run.reward, Some(fixture("llama_seqcls")));
    from_run.values = guide::published_values(&config, 2, &dir.path().join("work")).unwrap();
    assert_eq!(from_run.values.iter().map(|v| v.beta).collect::<Vec<_>>(), vec![1.0, 3.0]);
    let mut by_hand = from_run.clone();
    by_hand.values =
        (1..=2).map(|t| ValueSpec { dir: dir.path().join(format!("head-{t}")), beta: config.beta(t) }).collect();
    by_hand.output = dir.path().join("hand.jsonl");
    let (a, b) = (run(&from_run), run(&by_hand));
    assert_eq!(a.len(), rows.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        same_answer(x, y, &format!("row {i}"));
        assert!(x.contains_key("reward"), "the run's reward model picks (search.final = reward_argmax)");
    }
    assert_eq!(a[0]["id"], rows[0]["id"]);

    // V_3 was never published.
    let err = guide::published_values(&config, 3, &dir.path().join("work")).unwrap_err().to_string();
    assert!(err.contains("V_3 has not been published"), "{err}");
}

/// Review A1: a late attempt of V_1's train task (a partitioned gang finishing after attempt 2 was accepted) writes
/// only its own folder, so loaders keep reading the accepted bytes; an accepted file changed afterwards is refused.
#[test]
fn a_late_train_attempt_cannot_replace_the_accepted_value_and_a_changed_file_is_refused() {
    use iro_common::layout::RunLayout;
    use iro_common::store::{Store, sha256_hex};
    use iro_common::values::{ValueManifest, write_value_folder, write_value_manifest};

    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let config = tiny_run::tiny_run("fenced", &store_dir.display().to_string(), 1);
    let (store, layout) = (Store::open(&config.run.store).unwrap(), RunLayout::new("fenced").unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let head = |seed: u64| {
        let d = dir.path().join(format!("head-{seed}"));
        write_head(&d, 48, seed);
        std::fs::read(d.join("model.safetensors")).unwrap()
    };
    let (accepted, late) = (head(2), head(1));
    // Attempt 2 publishes and is accepted.
    let (_, sha) = rt
        .block_on(write_value_folder(&store, &layout, 1, 2, vec![("model.safetensors".into(), accepted.clone())]))
        .unwrap();
    rt.block_on(write_value_manifest(&store, &layout, &ValueManifest::new(&layout, "fenced", 1, 2, &sha))).unwrap();
    // Attempt 1 finishes late and publishes what it trained.
    rt.block_on(write_value_folder(&store, &layout, 1, 1, vec![("model.safetensors".into(), late.clone())])).unwrap();

    let loaded = guide::published_values(&config, 1, &dir.path().join("work")).unwrap();
    assert!(loaded[0].dir.ends_with("runs/fenced/iter-1/value/attempt-2/model"), "{:?}", loaded[0].dir);
    let bytes = std::fs::read(loaded[0].dir.join("model.safetensors")).unwrap();
    assert_eq!(sha256_hex(&bytes), sha256_hex(&accepted), "the accepted attempt's weights");

    // A V that was never accepted is "not published", whatever folders exist.
    let err = guide::published_values(&config, 2, &dir.path().join("work")).unwrap_err().to_string();
    assert!(err.contains("V_2 has not been published"), "{err}");

    // Someone writes over the accepted file: loading names the file and the accepted attempt.
    let file = store_dir.join("runs/fenced/iter-1/value/attempt-2/model/model.safetensors");
    std::fs::write(&file, &late).unwrap();
    let err = guide::published_values(&config, 1, &dir.path().join("work")).unwrap_err().to_string();
    assert!(err.contains("attempt-2/model/model.safetensors") && err.contains("accepted attempt 2"), "{err}");
}

#[test]
fn bad_input_is_refused_naming_the_file_line_field_or_folder() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"fine\"}\n\n{\"text\": \"no prompt here\"}\n").unwrap();
    let bad = job(dir.path(), prompts.clone(), "out.jsonl");
    let err = guide::run(&bad, &mut |_, _| {}).unwrap_err();
    assert_eq!(err.kind(), "data");
    let msg = err.to_string();
    assert!(msg.contains("prompts.jsonl:3") && msg.contains("missing field `prompt`"), "{msg}");
    assert!(!bad.output.exists(), "no output is written for bad input");

    std::fs::write(&prompts, "{\"prompt\": 7}\n").unwrap();
    let msg = guide::run(&bad, &mut |_, _| {}).unwrap_err().to_string();
    assert!(msg.contains("prompts.jsonl:1") && msg.contains("must be a string"), "{msg}");

    std::fs::write(&prompts, "{\"prompt\": \"fine\"}\n").unwrap();
    let empty = dir.path().join("empty_value");
    std::fs::create_dir_all(&empty).unwrap();
    let mut no_weights = bad.clone();
    no_weights.values[1].dir = empty.clone();
    let msg = guide::run(&no_weights, &mut |_, _| {}).unwrap_err().to_string();
    assert!(msg.contains("empty_value") && msg.contains("no model.safetensors"), "{msg}");

    let mut no_reward = bad.clone();
    no_reward.final_pick = FinalPick::RewardArgmax;
    let msg = guide::run(&no_reward, &mut |_, _| {}).unwrap_err().to_string();
    assert!(msg.contains("reward_argmax needs a reward model"), "{msg}");

    let mut zero_beta = bad.clone();
    zero_beta.values[0].beta = 0.0;
    let msg = guide::run(&zero_beta, &mut |_, _| {}).unwrap_err().to_string();
    assert!(msg.contains("llama_seqcls") && msg.contains("beta"), "{msg}");
}
