//! IRO end to end on the tiny fixtures (iro.md "One iteration t"): two iterations of rollout → reward →
//! select → value training → evaluation with every baseline, through the single-process driver into a local
//! store; then the guarantees an operator relies on: disjoint prompt slices, exactly one answer per test prompt
//! and method, the selected candidate is the reward argmax, a resumed run redoes nothing, and a lost phase
//! output is recomputed identically under a new attempt.

#[path = "support/tiny_run.rs"]
mod tiny_run;

use std::path::Path;

use iro_common::RunConfig;
use iro_common::config::{Baseline, ValueKind, ValueSharding};
use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{EvalRecord, RolloutRecord, read_accepted, read_manifest};
use iro_common::store::Store;
use iro_worker::model::ScalarModel;
use iro_worker::pipeline::report::Summary;
use iro_worker::pipeline::{Pipeline, local};
use tch::{Device, Kind};
use tiny_run::tiny_run;

/// The shared tiny run (support/tiny_run.rs) with the value kind, iterations and baselines under test.
fn config(store: &Path, kind: ValueKind, iterations: u32, baselines: Vec<Baseline>) -> RunConfig {
    let mut c = tiny_run("tiny", &store.display().to_string(), iterations);
    c.value.kind = kind;
    c.baselines.methods = baselines;
    c.validate(Path::new("test")).unwrap();
    c
}

fn run(config: &RunConfig, work: &Path) -> Summary {
    let mut p = Pipeline::open(config.clone(), None, work).unwrap();
    local::run_local(&mut p, &mut |_, _, _| {}).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn rollouts(store: &Store, t: u32) -> Vec<RolloutRecord> {
    let layout = RunLayout::new("tiny").unwrap();
    block_on(async {
        let m = read_manifest(store, &layout, t, ShardedPhase::Rollout).await.unwrap();
        read_accepted(store, &m).await.unwrap()
    })
}

fn evals(store: &Store, t: u32) -> Vec<EvalRecord> {
    let layout = RunLayout::new("tiny").unwrap();
    block_on(async {
        let m = read_manifest(store, &layout, t, ShardedPhase::Eval).await.unwrap();
        read_accepted(store, &m).await.unwrap()
    })
}

/// Every object key under the run, for "nothing was redone" checks.
fn keys(store: &Store) -> Vec<String> {
    let mut k = block_on(store.list("runs/tiny")).unwrap();
    k.sort();
    k
}

#[test]
fn two_iterations_with_every_baseline_then_resume_and_recompute() {
    let dir = tempfile::tempdir().unwrap();
    let all = vec![Baseline::Base, Baseline::BestOfN, Baseline::Args, Baseline::WeakToStrong];
    let c = config(&dir.path().join("store"), ValueKind::Head, 2, all);
    let summary = run(&c, &dir.path().join("work"));
    let store = Store::open(&c.run.store).unwrap();

    // Rollouts: 4 prompts per iteration, disjoint across iterations; 1 sample each at t = 1, W·K = 4 at t = 2;
    // exactly one candidate per prompt selected, and it is the reward argmax.
    let (r1, r2) = (rollouts(&store, 1), rollouts(&store, 2));
    assert_eq!(r1.len(), 4);
    assert_eq!(r2.len(), 16);
    assert!(r2.iter().all(|r| r.method == "cbs" && r.value_score.is_some()));
    let ids = |rs: &[RolloutRecord]| rs.iter().map(|r| r.prompt_id.clone()).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(ids(&r1).len(), 4);
    assert_eq!(ids(&r2).len(), 4);
    assert!(ids(&r1).is_disjoint(&ids(&r2)));
    for id in ids(&r2) {
        let cands: Vec<&RolloutRecord> = r2.iter().filter(|r| r.prompt_id == id).collect();
        assert_eq!(cands.iter().map(|r| r.selected).sum::<u32>(), 1, "{id}");
        let best = cands.iter().map(|r| r.reward.unwrap()).fold(f64::NEG_INFINITY, f64::max);
        let chosen = cands.iter().find(|r| r.selected == 1).unwrap();
        assert_eq!(chosen.reward.unwrap(), best, "{id}: the selected candidate is the reward argmax");
    }

    // Evaluation: the 4 held-out posts, never seen in a rollout, answered once by every method.
    let e1 = evals(&store, 1);
    let test_ids: std::collections::BTreeSet<String> = e1.iter().map(|e| e.prompt_id.clone()).collect();
    assert_eq!(test_ids.len(), 4);
    assert!(test_ids.is_disjoint(&ids(&r1)) && test_ids.is_disjoint(&ids(&r2)));
    for method in ["iro", "base", "best_of_n", "args", "weak_to_strong"] {
        let mut got: Vec<&str> = e1.iter().filter(|e| e.method == method).map(|e| e.prompt_id.as_str()).collect();
        got.sort_unstable();
        assert_eq!(got, test_ids.iter().map(String::as_str).collect::<Vec<_>>(), "{method}");
    }
    let e2 = evals(&store, 2);
    assert_eq!(e2.len(), 4, "only IRO is evaluated after iteration 1");
    assert!(e2.iter().all(|e| e.generator == "iro/iter-2" && e.reward.is_some() && e.reference_reward.is_some()));
    // Best-of-N sampled N responses per prompt; base one.
    let tokens = |m: &str| e1.iter().filter(|e| e.method == m).map(|e| e.tokens).sum::<u64>();
    assert!(tokens("best_of_n") > tokens("base"));

    let labels: Vec<String> = summary.rows.iter().map(|r| r.label()).collect();
    assert_eq!(labels, ["base", "best_of_n", "args", "weak_to_strong", "iro iter 1", "iro iter 2"]);
    assert!(summary.rows.iter().all(|r| r.prompts == 4 && r.reward.mean.is_finite()));
    let report = dir.path().join("store/runs/tiny/report");
    assert!(std::fs::read_to_string(report.join("summary.md")).unwrap().contains("| iro iter 2 | 4 |"));
    assert_eq!(&std::fs::read(report.join("reward.png")).unwrap()[..4], b"\x89PNG");

    // Resume of a finished run: nothing is recomputed or rewritten (report aside).
    let before: Vec<String> = keys(&store).into_iter().filter(|k| !k.contains("/report/")).collect();
    let again = run(&c, &dir.path().join("work"));
    let after: Vec<String> = keys(&store).into_iter().filter(|k| !k.contains("/report/")).collect();
    assert_eq!(before, after);
    assert_eq!(again, summary);

    // A lost phase output (iteration 2's eval manifest) is recomputed under attempt 2, with the same answers:
    // every seed derives from the run seed and the prompt, not from the attempt.
    std::fs::remove_file(dir.path().join("store/runs/tiny/iter-2/eval/manifest.json")).unwrap();
    let redone = run(&c, &dir.path().join("work"));
    assert!(keys(&store).iter().any(|k| k.ends_with("iter-2/eval/shard-00000.attempt-2.jsonl")));
    let mut old = e2.clone();
    let mut new = evals(&store, 2);
    let strip = |rs: &mut Vec<EvalRecord>| {
        rs.iter_mut().for_each(|r| r.seconds = 0.0);
        rs.sort_by(|a, b| a.prompt_id.cmp(&b.prompt_id));
    };
    strip(&mut old);
    strip(&mut new);
    assert_eq!(old, new);
    assert_eq!(redone.rows.len(), summary.rows.len());
}

#[test]
fn model_kind_values_are_published_as_hf_seqcls_folders_and_guide_the_next_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(&dir.path().join("store"), ValueKind::Model, 2, vec![Baseline::Base]);
    let summary = run(&c, &dir.path().join("work"));
    for t in 1..=2 {
        let folder = dir.path().join(format!("store/runs/tiny/iter-{t}/value/attempt-1/model"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
        assert!(folder.join("tokenizer.json").exists());
        ScalarModel::load(&folder, Kind::Float, Device::Cpu).unwrap();
    }
    // V_1 warm-starts V_2: the published weights differ (V_2 trained further on new data).
    let w = |t: u32| {
        std::fs::read(dir.path().join(format!("store/runs/tiny/iter-{t}/value/attempt-1/model/model.safetensors")))
    };
    assert_ne!(w(1).unwrap(), w(2).unwrap());
    assert_eq!(summary.rows.len(), 3);
}

#[test]
fn ridge_heads_are_published_as_linear_heads_and_guide_the_next_rollout() {
    use iro_common::config::HeadFit;
    use iro_common::records::ValueTraining;
    use iro_worker::model::heads::{Head, LINEAR_VALUE_HEAD, load_value_head};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("store"), ValueKind::Head, 2, vec![Baseline::Base]);
    c.value.head_fit = HeadFit::Ridge;
    c.select.first_samples = 2;
    c.validate(Path::new("test")).unwrap();
    let summary = run(&c, &dir.path().join("work"));
    let store = Store::open(&c.run.store).unwrap();
    let layout = RunLayout::new("tiny").unwrap();
    let mut weights = Vec::new();
    for t in 1..=2 {
        let folder = dir.path().join(format!("store/runs/tiny/iter-{t}/value/attempt-1/model"));
        let Head::Linear(head) = load_value_head(&folder, Device::Cpu).unwrap() else {
            panic!("V_{t} is not a linear head")
        };
        let names: Vec<String> = tch::Tensor::read_safetensors(folder.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(LINEAR_VALUE_HEAD.iter().all(|n| names.iter().any(|m| m == n)), "{names:?}");
        let training: ValueTraining =
            block_on(store.get_json(&format!("{}/training.json", layout.value_model(t, 1)))).unwrap();
        let alpha = training.ridge_alpha.expect("a ridge fit records its shrinkage");
        assert!(iro_worker::train::ridge::ALPHAS.contains(&alpha), "{training:?}");
        assert!(training.cv_loss.is_some_and(f64::is_finite), "{training:?}");
        // Raw reward targets are fitted pooled: at or below the best constant's loss.
        assert!(training.final_loss <= training.constant_loss + 1e-9, "{training:?}");
        weights.push(head.weight);
    }
    // V_2 is its own fit (shrunk towards V_1, not a copy of it), and it guided iteration 2's search.
    assert!(weights[0].size() == weights[1].size() && weights[0] != weights[1]);
    assert!(rollouts(&store, 2).iter().all(|r| r.method == "cbs" && r.value_score.is_some_and(f64::is_finite)));
    assert_eq!(summary.rows.len(), 3);
}

#[test]
fn heads_on_an_inner_layer_record_it_and_guide_from_that_layers_states() {
    use iro_common::config::HeadFit;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("store"), ValueKind::Head, 2, vec![Baseline::Base]);
    // The fixture has 2 decoder layers: the heads read the states after the first.
    c.value.feature_layers = 1;
    c.value.head_fit = HeadFit::Ridge;
    c.select.first_samples = 2;
    c.validate(Path::new("test")).unwrap();
    let summary = run(&c, &dir.path().join("work"));
    for t in 1..=2 {
        let folder = dir.path().join(format!("store/runs/tiny/iter-{t}/value/attempt-1/model"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["feature_layers"], 1, "V_{t}: {config}");
    }
    // The same run on the final states: the depth reaches the guide, so iteration 2's value scores differ.
    // (That the tapped states CBS reads equal a forward to that depth is tests/search.rs's check.)
    let store = Store::open(&c.run.store).unwrap();
    let mut flat = c.clone();
    flat.value.feature_layers = 0;
    flat.run.store = dir.path().join("store-flat").display().to_string();
    let _ = run(&flat, &dir.path().join("work-flat"));
    let scores = |s: &Store| -> Vec<f64> { rollouts(s, 2).iter().map(|r| r.value_score.unwrap()).collect() };
    let (inner, last) = (scores(&store), scores(&Store::open(&flat.run.store).unwrap()));
    assert!(inner.iter().all(|v| v.is_finite()) && inner != last, "{inner:?} vs {last:?}");
    assert_eq!(summary.rows.len(), 3);
    // A depth beyond the policy's layers is named.
    c.value.feature_layers = 3;
    c.run.store = dir.path().join("store-deep").display().to_string();
    let mut p = Pipeline::open(c, None, &dir.path().join("work-deep")).unwrap();
    let err = local::run_local(&mut p, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(err.contains("value.feature_layers = 3"), "{err}");
}

#[test]
fn pooled_heads_record_their_pooling_and_guide_the_next_rollout() {
    use iro_common::config::{HeadFit, ValuePooling};
    use iro_worker::model::heads::{Head, load_value_head};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("store"), ValueKind::Head, 2, vec![Baseline::Base]);
    c.value.head_fit = HeadFit::Ridge;
    c.value.pooling = ValuePooling::LastMean;
    c.select.first_samples = 2;
    c.validate(Path::new("test")).unwrap();
    let summary = run(&c, &dir.path().join("work"));
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.policy.model.join("config.json")).unwrap()).unwrap();
    let hidden = policy["hidden_size"].as_i64().unwrap();
    for t in 1..=2 {
        let folder = dir.path().join(format!("store/runs/tiny/iter-{t}/value/attempt-1/model"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["pooling"], "last_mean", "V_{t}: {config}");
        let Head::Linear(head) = load_value_head(&folder, Device::Cpu).unwrap() else { panic!("V_{t} is not linear") };
        assert_eq!(head.weight.size(), [1, 2 * hidden], "V_{t} reads the last state and the mean");
    }
    let store = Store::open(&c.run.store).unwrap();
    assert!(rollouts(&store, 2).iter().all(|r| r.method == "cbs" && r.value_score.is_some_and(f64::is_finite)));
    assert_eq!(summary.rows.len(), 3);
    // Pooled states are the ridge fit's alone.
    c.value.head_fit = HeadFit::Adamw;
    let err = c.validate(Path::new("test")).unwrap_err().to_string();
    assert!(err.contains("value.pooling"), "{err}");
}

#[test]
fn a_config_whose_data_is_too_small_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("store"), ValueKind::Head, 1, vec![]);
    c.data.test_prompts = 40;
    let err = Pipeline::open(c, None, dir.path()).err().expect("12 posts cannot hold 40 test prompts");
    assert!(err.to_string().contains("data.test_prompts"), "{err}");
}

#[test]
fn a_two_rank_gang_through_the_embedded_cluster_trains_the_single_rank_value_function_plain_or_sharded() {
    use std::sync::Arc;

    use iro_worker::runtime::{CancellationToken, SharedRunnerFactory, TaskRunner, run_embedded};

    let dir = tempfile::tempdir().unwrap();
    let single = config(&dir.path().join("single"), ValueKind::Head, 1, vec![Baseline::Base]);
    run(&single, &dir.path().join("work-single"));

    // The same run on a coordinator with 2 workers whose train task is a gang of 2 ranks over the TCP ring, plain
    // and fully sharded (ZeRO-3: the published V_t is the gathered model).
    for sharding in [ValueSharding::None, ValueSharding::Full] {
        let name = format!("gang-{}", sharding.as_str());
        let mut gang = config(&dir.path().join(&name), ValueKind::Head, 1, vec![Baseline::Base]);
        gang.cluster.train_ranks = 2;
        gang.value.sharding = sharding;
        gang.validate(Path::new("test")).unwrap();
        let work = dir.path().join(format!("work-{name}"));
        let factory: SharedRunnerFactory = Arc::new(move |c: &RunConfig| {
            let runner: Box<dyn TaskRunner> = Box::new(Pipeline::open(c.clone(), None, &work)?);
            Ok(runner)
        });
        let rt = tokio::runtime::Runtime::new().unwrap();
        let state = dir.path().join(format!("state-{name}"));
        rt.block_on(run_embedded(gang.clone(), 2, &state, factory, CancellationToken::new())).unwrap();

        let weights = |root: &Path| {
            let file = root.join("runs/tiny/iter-1/value/attempt-1/model/model.safetensors");
            let mut t = tch::Tensor::read_safetensors(&file).unwrap();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            t
        };
        let (a, b) = (weights(&dir.path().join("single")), weights(&dir.path().join(&name)));
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let diff = (ta - tb).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "{na}: 2-rank ({sharding:?}) and 1-rank weights differ by {diff}");
        }
        // Same rollouts and evaluation too: the runs differ only in how training was spread.
        let (ea, eb) =
            (evals(&Store::open(&single.run.store).unwrap(), 1), evals(&Store::open(&gang.run.store).unwrap(), 1));
        let outputs = |e: &[EvalRecord]| {
            let mut v: Vec<(String, String, String)> =
                e.iter().map(|r| (r.method.clone(), r.prompt_id.clone(), r.output.clone())).collect();
            v.sort();
            v
        };
        assert_eq!(outputs(&ea), outputs(&eb));
    }
}

#[test]
fn a_missing_model_folder_or_w2s_pair_is_named_by_its_config_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("store"), ValueKind::Head, 1, vec![Baseline::WeakToStrong]);
    c.baselines.w2s_untuned = Default::default();
    let err = Pipeline::open(c.clone(), None, dir.path()).err().expect("no untuned model");
    assert!(err.to_string().contains("baselines.w2s_untuned"), "{err}");
    c.baselines.methods = vec![Baseline::Base];
    c.reward.model = dir.path().join("no-such-folder");
    let err = Pipeline::open(c, None, dir.path()).err().expect("missing reward model");
    assert!(err.to_string().contains("reward.model") && err.to_string().contains("no-such-folder"), "{err}");
}

#[test]
fn the_sample_efficiency_benchmark_pairs_cbs_with_best_of_n_and_counts_sampled_tokens() {
    use iro_worker::pipeline::efficiency::{EfficiencySpec, Guide, efficiency_markdown, efficiency_png};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), ValueKind::Head, 1, vec![Baseline::Base]);
    c.baselines.best_of_n = 2;
    run(&c, &dir.path().join("work"));
    let mut p = Pipeline::open(c.clone(), None, &dir.path().join("work")).unwrap();
    let spec = EfficiencySpec {
        iteration: 1,
        prompts: 3,
        best_of: vec![1, 4],
        shapes: vec![(2, 2)],
        chunk_lengths: vec![2],
        guides: vec![Guide::Constant, Guide::Value, Guide::Oracle],
    };
    let mut calls = 0;
    let rows = p
        .sample_efficiency(&spec, |done, total| {
            calls += 1;
            assert!(done <= total && total == 5);
        })
        .unwrap();
    assert_eq!(calls, 5);
    assert_eq!(rows.len(), 5);
    let max = c.sampling.max_new_tokens as f64;
    for r in &rows {
        assert!(r.prompts > 0 && r.reward.mean.is_finite(), "{r:?}");
        // At most rows × max_new_tokens sampled per prompt, at least one token per row.
        assert!(r.tokens_per_prompt <= r.rows as f64 * max && r.tokens_per_prompt >= r.rows as f64, "{r:?}");
    }
    // CBS at W·K = 4 is paired with Best-of-4 (the same prompts), Best-of-N with nothing.
    assert!(rows.iter().filter(|r| r.method == "cbs").all(|r| r.rows == 4 && r.diff_vs_best_of_n.is_some()));
    assert!(rows.iter().filter(|r| r.method == "best_of_n").all(|r| r.diff_vs_best_of_n.is_none()));
    // Best-of-4 picks the reward argmax of 4 samples whose first is Best-of-1's: never below it on any prompt,
    // so never below it on average.
    assert!(rows[1].reward.mean >= rows[0].reward.mean - 1e-9);
    assert!(efficiency_markdown(&rows).contains("cbs oracle W2 K2 L2"));
    assert!(efficiency_png(&rows).starts_with(b"\x89PNG"));
}

#[test]
fn the_value_benchmark_retrains_the_runs_own_v1_and_ranks_its_diagnostic_candidates_alike() {
    use iro_common::config::HeadFit;
    use iro_common::config::{ValuePooling, ValueTargets};
    use iro_common::records::ValueTraining;
    use iro_worker::pipeline::report::summarize_values;
    use iro_worker::pipeline::value_bench::{ValueBenchSpec, value_bench_markdown};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("store"), ValueKind::Head, 1, vec![Baseline::Base, Baseline::BestOfN]);
    // V_1 learns from every one of 2 plain samples per prompt, as the benchmark's examples are.
    c.select.first_samples = 2;
    c.select.per_prompt = 2;
    c.value.targets = ValueTargets::PromptCentred;
    run(&c, &dir.path().join("work"));
    let store = Store::open(&c.run.store).unwrap();
    let layout = RunLayout::new("tiny").unwrap();
    let training: ValueTraining =
        block_on(store.get_json(&format!("{}/training.json", layout.value_model(1, 1)))).unwrap();
    let report = summarize_values(&evals(&store, 1), &[(1, training.clone())].into_iter().collect());

    let p = Pipeline::open(c.clone(), None, &dir.path().join("work")).unwrap();
    let spec = ValueBenchSpec {
        train_prompts: vec![c.data.prompts_per_iteration],
        samples: vec![1, 2],
        test_prompts: c.data.test_prompts,
        epochs: vec![c.value.epochs, 3 * c.value.epochs],
        lrs: vec![c.value.lr],
        weight_decays: vec![c.value.weight_decay],
        widths: vec![c.value.head_width],
        targets: vec![ValueTargets::PromptCentred, ValueTargets::Reward],
        fits: vec![HeadFit::Adamw, HeadFit::Ridge],
        // All layers, then the tiny model's 2 of 2 (the same states), then its first layer alone.
        layers: vec![0, 2, 1],
        pooling: vec![ValuePooling::Last],
    };
    let mut last = (0, 0);
    let all_rows = p.value_bench(&spec, |done, total| last = (done, total)).unwrap();
    // 3 depths × 2 samples × 2 targets × (2 epoch settings of adamw + 1 ridge row).
    assert_eq!(all_rows.len(), 36);
    assert_eq!(last, (36, 36));
    let (rows, rest) = all_rows.split_at(12);
    let (two, one) = rest.split_at(12);
    for (a, b) in rows.iter().zip(two) {
        assert_eq!((a.layers, b.layers), (0, 2));
        assert_eq!((a.final_loss, a.concordance.mean), (b.final_loss, b.concordance.mean), "{a:?} vs {b:?}");
    }
    assert!(one.iter().all(|r| r.layers == 1));
    assert!(rows.iter().zip(one).any(|(a, b)| a.final_loss != b.final_loss), "one layer's states are not the last's");
    for r in rows.iter().filter(|r| r.fit == HeadFit::Ridge) {
        let alpha = r.alpha.unwrap();
        assert!(iro_worker::train::ridge::ALPHAS.contains(&alpha), "{r:?}");
        // Pooled, the ridge fit's loss is at or below the constant's (w = 0 is a candidate and the penalty only
        // adds); the within-prompt fit minimises a different loss and has no such bound.
        if r.targets == ValueTargets::Reward {
            assert!(r.final_loss <= r.constant_loss + 1e-9, "{r:?}");
        }
    }
    // The run's own settings (2 samples, centred, the config's epochs) train the run's V_1 again: the same examples
    // in the same order, seed and schedule, so the same fit and the same ranking of the report's candidates.
    let own = rows
        .iter()
        .find(|r| r.samples == 2 && r.targets == ValueTargets::PromptCentred && r.epochs == c.value.epochs)
        .unwrap();
    assert_eq!((own.examples, own.steps), (training.examples, training.steps));
    assert!((own.constant_loss - training.constant_loss).abs() < 1e-9, "{own:?} vs {training:?}");
    assert!((own.final_loss - training.final_loss).abs() < 1e-5, "{own:?} vs {training:?}");
    let v1 = &report[0];
    assert!((own.concordance.mean - v1.concordance.mean).abs() < 1e-9, "{own:?} vs {v1:?}");
    assert!((own.prefix_concordance.mean - v1.prefix_concordance.mean).abs() < 1e-9, "{own:?} vs {v1:?}");
    assert!((own.argmax_agreement.mean - v1.argmax_agreement.mean).abs() < 1e-9, "{own:?} vs {v1:?}");
    // One sample per prompt leaves nothing to centre: every centred target is 0, and so is the best constant's loss.
    for r in rows.iter().filter(|r| r.samples == 1) {
        assert_eq!(r.examples, c.data.prompts_per_iteration);
        if r.targets == ValueTargets::PromptCentred {
            assert!(r.constant_loss.abs() < 1e-12, "{r:?}");
        }
    }
    // Centring removes the between-prompt spread, so the constant's loss can only drop.
    for r in rows.iter().filter(|r| r.targets == ValueTargets::Reward) {
        let centred = rows
            .iter()
            .find(|x| x.targets == ValueTargets::PromptCentred && x.samples == r.samples && x.epochs == r.epochs)
            .unwrap();
        assert!(centred.constant_loss <= r.constant_loss + 1e-12, "{centred:?} vs {r:?}");
    }
    assert!(value_bench_markdown(rows).contains("prompt_centred"));
}
