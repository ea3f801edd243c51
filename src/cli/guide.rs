//! `iro guide`: decode prompts with a frozen policy guided by trained value functions (chunk-level beam search),
//! from explicit folders or from a run's published V_1..V_t, with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use iro_common::RunConfig;
use iro_common::config::PromptFormat;
use iro_worker::jobs::Placement;
use iro_worker::jobs::guide::{self, GuideJob, ValueSpec};
use iro_worker::search::FinalPick;

use super::generate::ChatTemplate;
use super::progress::Bar;

/// Rows per forward batch when neither --batch-size nor a run says otherwise.
const DEFAULT_ROWS: usize = 64;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Final {
    /// The reward model's argmax among the W·K final rows (needs a reward model).
    #[value(name = "reward_argmax", alias = "reward-argmax")]
    RewardArgmax,
    /// The guiding score's argmax.
    #[value(name = "value_argmax", alias = "value-argmax")]
    ValueArgmax,
    /// Row 0: the first successor of the best beam of the last selection.
    First,
}

#[derive(Debug, Args)]
#[command(after_help = "Output rows are the input rows plus `output` (the decoded answer), `token_ids`, `score` (the \
    guiding score Σ V_i/β_i of the answer) and, when a reward model picked it, `reward`; with --all-candidates also \
    `candidates`, every final row of the search (W·K) with the same fields. A row's answer depends only on its \
    prompt, the seed and its row index, not on the rows it is batched with (the same rule as `iro generate`).")]
pub struct GuideArgs {
    /// HF causal LM folder of the frozen policy [default with --run: the run's policy.model].
    #[arg(long, required_unless_present = "run")]
    pub policy: Option<PathBuf>,
    /// A value function's folder, optionally with its beta (default 1): `model` kind (an HF
    /// *ForSequenceClassification folder) or `head` kind (model.safetensors with `value_head.*` tensors, an MLP on
    /// the policy's own hidden states). Repeat for V_1..V_t; one ensemble is of one kind. With --run, replaces the
    /// run's values.
    #[arg(long = "value", value_name = "DIR[:BETA]", value_parser = parse_value, required_unless_present = "run")]
    pub values: Vec<ValueSpec>,
    /// Take the policy, V_1..V_t (from the run's store), betas, prompt format, sampling and search settings, seed,
    /// device, dtype and reward model from this run config; the flags given here override them.
    #[arg(long, value_name = "CONFIG", requires = "iteration")]
    pub run: Option<PathBuf>,
    /// With --run: guide with V_1..V_t of this iteration t.
    #[arg(long, value_name = "T", requires = "run")]
    pub iteration: Option<u32>,
    /// With --run: where the values of a remote store are downloaded.
    #[arg(long, default_value = ".iro-work")]
    pub work_dir: PathBuf,
    /// JSON Lines with a `prompt` field per row (other fields are kept). A TL;DR run's rows may have
    /// `subreddit`, `title`, `post` instead, formatted as its training prompts were.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSON Lines (see below).
    #[arg(long)]
    pub output: PathBuf,
    /// W: beams kept per prompt at each selection [default: 4, or the run's].
    #[arg(long)]
    pub beams: Option<usize>,
    /// K: successors sampled from each beam [default: 4, or the run's].
    #[arg(long)]
    pub successors: Option<usize>,
    /// L: tokens per chunk between selections [default: 8, or the run's].
    #[arg(long)]
    pub chunk_length: Option<usize>,
    /// [default: 53, or the run's sampling.max_new_tokens]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// 0 is greedy (a beam's K successors are then all alike) [default: 0.7, or the run's].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// 0 disables top-k [default: 50, or the run's].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// [default: 1.0, or the run's]
    #[arg(long)]
    pub top_p: Option<f64>,
    /// [default: 0, or the run's run.seed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Which of a prompt's W·K final rows is its answer [default: reward_argmax when --reward is given; else,
    /// with --run, the run's search.final (reward_argmax picks with the run's reward.model); else value_argmax].
    #[arg(long = "final", value_enum)]
    pub final_pick: Option<Final>,
    /// Reward model (HF *ForSequenceClassification or TL;DR ScalarModel folder) for --final reward_argmax.
    #[arg(long, value_name = "DIR")]
    pub reward: Option<PathBuf>,
    /// raw: each prompt as given; chatml / llama3: wrapped as one user turn of that chat template [default:
    /// raw, or the run's policy.prompt_format].
    #[arg(long, value_enum)]
    pub chat_template: Option<ChatTemplate>,
    /// Prompts per search; each runs W·K rows [default: 64 rows' worth, or the run's sampling.batch_size rows'
    /// worth; at least 1].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Also write every final row of each prompt's search under `candidates`.
    #[arg(long)]
    pub all_candidates: bool,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16, f16 [default: auto, or the run's].
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto (CUDA when libtorch sees it), cpu, cuda, cuda:N [default: auto, or the run's].
    #[arg(long)]
    pub device: Option<String>,
}

/// `DIR` or `DIR:BETA`; a folder that exists under the whole name is taken as it is, colon and all.
fn parse_value(s: &str) -> Result<ValueSpec, String> {
    let whole = PathBuf::from(s);
    let (dir, beta) = match s.rsplit_once(':') {
        Some((dir, beta)) if !whole.exists() => {
            let b: f64 = beta.parse().map_err(|_| format!("`{s}`: BETA `{beta}` is not a number (DIR[:BETA])"))?;
            (PathBuf::from(dir), b)
        }
        _ => (whole, 1.0),
    };
    if dir.as_os_str().is_empty() {
        return Err(format!("`{s}`: no folder before the colon (DIR[:BETA])"));
    }
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(format!("`{s}`: beta must be positive and finite, got {beta}"));
    }
    Ok(ValueSpec { dir, beta })
}

pub fn guide(args: GuideArgs) -> anyhow::Result<()> {
    let job = job(args)?;
    let mut bar = Bar::new("guide");
    let summary = guide::run(&job, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    tracing::info!(
        rows = summary.rows,
        sampled_tokens = summary.sampled_tokens,
        seconds = format!("{:.1}", summary.seconds),
        output = %job.output.display(),
        "guided decoding done"
    );
    Ok(())
}

/// The job: the run's settings (or the defaults), then every flag given.
fn job(args: GuideArgs) -> anyhow::Result<GuideJob> {
    let (mut job, rows) = match (&args.run, args.iteration) {
        (Some(path), Some(t)) => {
            let config = RunConfig::load(path)?;
            let mut job = GuideJob::from_run(&config, args.prompts.clone(), args.output.clone());
            if args.values.is_empty() {
                job.values = guide::published_values(&config, t, &args.work_dir)
                    .with_context(|| format!("V_1..V_{t} of run `{}`", config.run.id))?;
            }
            (job, config.sampling.batch_size)
        }
        (None, _) => (defaults(args.prompts.clone(), args.output.clone()), DEFAULT_ROWS),
        (Some(_), None) => bail!("--run needs --iteration"),
    };
    if let Some(p) = args.policy {
        job.policy = p;
    }
    if !args.values.is_empty() {
        job.values = args.values;
    }
    let set = |slot: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    set(&mut job.beams, args.beams);
    set(&mut job.successors, args.successors);
    set(&mut job.chunk_len, args.chunk_length);
    set(&mut job.max_new_tokens, args.max_new_tokens);
    set(&mut job.sampling.top_k, args.top_k);
    if let Some(t) = args.temperature {
        job.sampling.temperature = t;
    }
    if let Some(p) = args.top_p {
        job.sampling.top_p = p;
    }
    let t = job.sampling.temperature;
    anyhow::ensure!(t >= 0.0 && t.is_finite(), "--temperature must be a finite number >= 0, got {t}");
    anyhow::ensure!(job.sampling.top_p > 0.0 && job.sampling.top_p <= 1.0, "--top-p must be in (0, 1]");
    if let Some(s) = args.seed {
        job.seed = s;
    }
    if let Some(r) = args.reward {
        // A reward given here picks the answer unless --final says otherwise, whatever a run's search.final is.
        job.reward = Some(r);
        job.final_pick = FinalPick::RewardArgmax;
    }
    if let Some(f) = args.final_pick {
        job.final_pick = match f {
            Final::RewardArgmax => FinalPick::RewardArgmax,
            Final::ValueArgmax => FinalPick::ValueArgmax,
            Final::First => FinalPick::First,
        };
    }
    if let Some(c) = args.chat_template {
        job.prompt_format = match c {
            ChatTemplate::Raw => PromptFormat::Raw,
            ChatTemplate::Chatml => PromptFormat::Chatml,
            ChatTemplate::Llama3 => PromptFormat::Llama3,
        };
    }
    job.all_candidates = args.all_candidates;
    job.batch_size = args.batch_size.unwrap_or_else(|| (rows / (job.beams * job.successors).max(1)).max(1));
    if let Some(d) = args.device {
        job.placement.device = d;
    }
    if let Some(d) = args.dtype {
        job.placement.dtype = d;
    }
    Ok(job)
}

/// The paper's TL;DR search and sampling settings (the run config's defaults), raw prompts, seed 0, no reward
/// (so the guiding score picks).
fn defaults(prompts: PathBuf, output: PathBuf) -> GuideJob {
    let c = RunConfig::default();
    let mut job = GuideJob::from_run(&c, prompts, output);
    job.policy = PathBuf::new();
    job.reward = None;
    job.final_pick = FinalPick::ValueArgmax;
    job.seed = 0;
    job.prompt_format = PromptFormat::Raw;
    job.placement = Placement { device: "auto".into(), dtype: "auto".into() };
    job
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: GuideArgs,
    }

    fn parse(args: &[&str]) -> GuideArgs {
        let mut all = vec!["guide", "--prompts", "in.jsonl", "--output", "out.jsonl"];
        all.extend_from_slice(args);
        Cmd::try_parse_from(all).unwrap().args
    }

    /// A run config with V_1 and V_2 published (head kind) in a local store under `dir`.
    fn run_config(dir: &std::path::Path) -> PathBuf {
        let store = dir.join("store");
        let path = dir.join("run.toml");
        let toml = format!(
            "[run]\nid = \"g\"\nseed = 11\niterations = 2\nstore = \"{}\"\ndevice = \"cpu\"\n\
             [policy]\nmodel = \"policy-dir\"\nprompt_format = \"chatml\"\n\
             [sampling]\ntemperature = 0.5\nmax_new_tokens = 20\nbatch_size = 24\n\
             [search]\nbeams = 2\nsuccessors = 3\nchunk_length = 5\nfinal = \"value_argmax\"\n\
             [value]\nbetas = [1.0, 2.0]\n",
            store.display()
        );
        std::fs::write(&path, toml).unwrap();
        let config = iro_common::RunConfig::load(&path).unwrap();
        for t in 1..=2 {
            let v = dir.join(format!("v{t}"));
            std::fs::create_dir_all(&v).unwrap();
            std::fs::write(v.join("model.safetensors"), format!("stand-in {t}: only its checksum is checked")).unwrap();
            iro_worker::jobs::guide::publish_value_folder(&config, t, &v).unwrap();
        }
        path
    }

    #[test]
    fn a_run_gives_every_setting_and_each_flag_given_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = run_config(dir.path());
        let work = dir.path().join("work");
        let (c, w) = (config.to_str().unwrap(), work.to_str().unwrap());
        let from_run = job(parse(&["--run", c, "--iteration", "2", "--work-dir", w])).unwrap();
        assert_eq!(from_run.policy, PathBuf::from("policy-dir"));
        assert_eq!(from_run.values.iter().map(|v| v.beta).collect::<Vec<_>>(), vec![1.0, 2.0]);
        assert!(from_run.values[1].dir.ends_with("runs/g/iter-2/value/attempt-1/model"));
        assert_eq!((from_run.beams, from_run.successors, from_run.chunk_len), (2, 3, 5));
        assert_eq!((from_run.max_new_tokens, from_run.sampling.temperature, from_run.seed), (20, 0.5, 11));
        assert_eq!((from_run.final_pick, from_run.prompt_format), (FinalPick::ValueArgmax, PromptFormat::Chatml));
        assert_eq!(from_run.batch_size, 4, "the run's 24 rows over W·K = 6");
        assert_eq!(from_run.placement.device, "cpu");
        assert!(!from_run.all_candidates);

        let overridden = job(parse(&[
            "--run",
            c,
            "--iteration",
            "1",
            "--work-dir",
            w,
            "--policy",
            "other",
            "--beams",
            "3",
            "--seed",
            "4",
            "--temperature",
            "0",
            "--chat-template",
            "raw",
            "--reward",
            "rm",
            "--all-candidates",
            "--device",
            "cuda",
        ]))
        .unwrap();
        assert_eq!(overridden.values.len(), 1, "V_1 only at iteration 1");
        assert_eq!(overridden.policy, PathBuf::from("other"));
        assert_eq!((overridden.beams, overridden.successors, overridden.seed), (3, 3, 4));
        assert_eq!(overridden.sampling.temperature, 0.0);
        assert_eq!(overridden.prompt_format, PromptFormat::Raw);
        // A reward given picks the answer, though the run's search.final says value_argmax.
        assert_eq!((overridden.final_pick, overridden.reward), (FinalPick::RewardArgmax, Some("rm".into())));
        assert_eq!(overridden.batch_size, 2, "24 rows over W·K = 9");
        assert!(overridden.all_candidates);
        assert_eq!(overridden.placement.device, "cuda");

        // --value replaces the run's values; --final beats the reward's default.
        let mine = job(parse(&[
            "--run",
            c,
            "--iteration",
            "2",
            "--work-dir",
            w,
            "--value",
            "mine:4",
            "--reward",
            "rm",
            "--final",
            "first",
        ]))
        .unwrap();
        assert_eq!(mine.values, vec![ValueSpec { dir: "mine".into(), beta: 4.0 }]);
        assert_eq!(mine.final_pick, FinalPick::First);

        let err = job(parse(&["--run", c, "--iteration", "3", "--work-dir", w])).unwrap_err();
        assert!(format!("{err:#}").contains("V_3 has not been published"), "{err:#}");
    }

    #[test]
    fn without_a_run_the_paper_defaults_and_the_guiding_score_pick() {
        let plain = job(parse(&["--policy", "p", "--value", "v"])).unwrap();
        assert_eq!((plain.beams, plain.successors, plain.chunk_len, plain.max_new_tokens), (4, 4, 8, 53));
        assert_eq!((plain.final_pick, plain.reward.as_ref()), (FinalPick::ValueArgmax, None));
        assert_eq!((plain.seed, plain.prompt_format, plain.batch_size), (0, PromptFormat::Raw, 4));
        assert_eq!(
            job(parse(&["--policy", "p", "--value", "v", "--reward", "r"])).unwrap().final_pick,
            FinalPick::RewardArgmax
        );
        assert!(
            Cmd::try_parse_from(["guide", "--prompts", "a", "--output", "b", "--value", "v"]).is_err(),
            "no policy"
        );
        assert!(Cmd::try_parse_from(["guide", "--prompts", "a", "--output", "b", "--run", "r.toml"]).is_err(), "no t");
        let err = job(parse(&["--policy", "p", "--value", "v", "--top-p", "1.5"])).unwrap_err();
        assert!(err.to_string().contains("--top-p"), "{err}");
    }

    #[test]
    fn a_value_takes_an_optional_beta_after_its_last_colon() {
        assert_eq!(parse_value("v1").unwrap(), ValueSpec { dir: "v1".into(), beta: 1.0 });
        assert_eq!(parse_value("runs/v2:2.5").unwrap(), ValueSpec { dir: "runs/v2".into(), beta: 2.5 });
        let err = parse_value("v1:two").unwrap_err();
        assert!(err.contains("`two` is not a number"), "{err}");
        assert!(parse_value("v1:0").unwrap_err().contains("positive"));
        assert!(parse_value("v1:-1").unwrap_err().contains("positive"));
        assert!(parse_value(":2").unwrap_err().contains("no folder"));
    }
}
