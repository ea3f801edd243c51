//! `iro bench generate`: our batched sampling against transformers' `generate`, ratio printed.
//! `iro bench search`: the sample-efficiency benchmark of a run (Best-of-N and CBS under constant, trained and
//! oracle guidance at equal rows per prompt), a table, JSON and a plot.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::jobs::bench::{self, BenchConfig};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Tokens/second of batched sampling vs transformers' generate on the same weights and token counts.
    Generate(BenchGenerateArgs),
    /// Reward against tokens sampled: Best-of-N at several N, CBS at W·K rows guided by a constant, the run's
    /// trained values and the reward itself (the oracle), on the run's test prompts and seeds.
    Search(BenchSearchArgs),
    /// Which value-training settings learn here: head-kind V_1s trained over a grid (training prompts, samples
    /// per prompt, targets, epochs, lr, weight decay, width) on iteration 1's plain samples, each ranked on held-out
    /// Best-of-N candidates of the test prompts (concordance with the reward, complete and after the first chunk).
    Value(BenchValueArgs),
}

#[derive(Debug, Args)]
pub struct BenchValueArgs {
    /// The run config: policy, reward, data, sampling and the `[value]` settings the grid does not vary.
    pub config: PathBuf,
    /// Training prompts (prefixes of iteration 1's rollout prompts).
    #[arg(long, value_delimiter = ',', default_value = "24")]
    pub train_prompts: Vec<usize>,
    /// Plain samples per training prompt; default: the config's select.first_samples.
    #[arg(long, value_delimiter = ',')]
    pub samples: Vec<usize>,
    /// Held-out prompts (the first test prompts), baselines.best_of_n candidates each.
    #[arg(long, default_value_t = 32)]
    pub test_prompts: usize,
    /// Default: the config's value.epochs.
    #[arg(long, value_delimiter = ',')]
    pub epochs: Vec<usize>,
    /// Default: the config's value.lr.
    #[arg(long, value_delimiter = ',')]
    pub lr: Vec<f64>,
    /// Default: the config's value.weight_decay.
    #[arg(long, value_delimiter = ',')]
    pub weight_decay: Vec<f64>,
    /// Head widths; default: the config's value.head_width.
    #[arg(long, value_delimiter = ',')]
    pub width: Vec<usize>,
    /// Among reward, prompt_centred; default: the config's value.targets.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Among adamw (the MLP head, over the epochs/lr/decay/width grid) and ridge (a linear head, shrinkage by
    /// cross-validation); default: the config's value.head_fit.
    #[arg(long, value_delimiter = ',')]
    pub fits: Vec<String>,
    /// Feature depths: the states after this many decoder layers (then the final norm); 0 = all layers, the
    /// states a shipped head reads.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub layers: Vec<usize>,
    /// Among last, mean, last_mean: what of the states a head reads for a prefix; default: the config's
    /// value.pooling.
    #[arg(long, value_delimiter = ',')]
    pub pooling: Vec<String>,
    /// Where the table (.md) and rows (.json) go.
    #[arg(long, default_value = "runs/bench-value")]
    pub out: PathBuf,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, default_value = ".iro-work")]
    pub work_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchSearchArgs {
    /// The run config; its trained V_1..V_t are read from its store.
    pub config: PathBuf,
    /// Guide the `value` rows with V_1..V_t (0: leave the value rows out).
    #[arg(long, default_value_t = 0)]
    pub iteration: u32,
    /// The first this many test prompts of the run.
    #[arg(long, default_value_t = 32)]
    pub prompts: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub best_of: Vec<usize>,
    /// CBS shapes as WxK.
    #[arg(long, value_delimiter = ',', default_value = "2x2,4x2,2x4")]
    pub shapes: Vec<String>,
    /// Chunk lengths L; default: the run's search.chunk_length.
    #[arg(long, value_delimiter = ',')]
    pub chunk_lengths: Vec<usize>,
    /// Scorers among constant, value, oracle; default: all that apply.
    #[arg(long, value_delimiter = ',')]
    pub guides: Vec<String>,
    /// Where the table (.md), rows (.json) and plot (.png) go.
    #[arg(long, default_value = "runs/bench-search")]
    pub out: PathBuf,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, default_value = ".iro-work")]
    pub work_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[arg(long, default_value = "assets/smollm2-135m-instruct")]
    pub model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Weights and activations on both sides: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// libtorch intra-op threads, the same for both sides.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Best of this many runs per batch size.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Python with torch + transformers for the baseline (made by scripts/assets/check_smollm2.sh).
    #[arg(long, default_value = ".deps/pycheck/bin/python")]
    pub python: PathBuf,
    /// Skip the transformers baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Generate(a) => generate(a),
        BenchCommand::Search(a) => search(a),
        BenchCommand::Value(a) => value(a),
    }
}

fn value(a: BenchValueArgs) -> anyhow::Result<()> {
    use iro_common::config::{HeadFit, ValuePooling, ValueTargets};
    use iro_worker::pipeline::Pipeline;
    use iro_worker::pipeline::value_bench::{ValueBenchSpec, value_bench_json, value_bench_markdown};
    let config = iro_common::RunConfig::load(&a.config)?;
    let v = &config.value;
    let or = |xs: Vec<usize>, d: usize| if xs.is_empty() { vec![d] } else { xs };
    let targets = if a.targets.is_empty() {
        vec![v.targets]
    } else {
        a.targets
            .iter()
            .map(|t| match t.as_str() {
                "reward" => Ok(ValueTargets::Reward),
                "prompt_centred" => Ok(ValueTargets::PromptCentred),
                other => anyhow::bail!("--targets: `{other}` is not reward or prompt_centred"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let fits = if a.fits.is_empty() {
        vec![v.head_fit]
    } else {
        a.fits
            .iter()
            .map(|f| match f.as_str() {
                "adamw" => Ok(HeadFit::Adamw),
                "ridge" => Ok(HeadFit::Ridge),
                other => anyhow::bail!("--fits: `{other}` is not adamw or ridge"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let pooling = if a.pooling.is_empty() {
        vec![v.pooling]
    } else {
        a.pooling
            .iter()
            .map(|p| {
                ValuePooling::parse(p).ok_or_else(|| anyhow::anyhow!("--pooling: `{p}` is not last, mean or last_mean"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let spec = ValueBenchSpec {
        train_prompts: a.train_prompts,
        samples: or(a.samples, config.select.first_samples),
        test_prompts: a.test_prompts,
        epochs: or(a.epochs, v.epochs),
        lrs: if a.lr.is_empty() { vec![v.lr] } else { a.lr },
        weight_decays: if a.weight_decay.is_empty() { vec![v.weight_decay] } else { a.weight_decay },
        widths: or(a.width, v.head_width),
        targets,
        fits,
        layers: a.layers,
        pooling,
    };
    let pipeline = Pipeline::open(config, a.device.as_deref(), &a.work_dir)?;
    let mut bar = super::progress::Bar::new("bench value");
    let rows = pipeline.value_bench(&spec, |done, total| bar.update(done, total))?;
    bar.finish();
    std::fs::create_dir_all(&a.out)?;
    let md = value_bench_markdown(&rows);
    std::fs::write(a.out.join("value.md"), &md)?;
    std::fs::write(a.out.join("value.json"), value_bench_json(&rows)?)?;
    println!("{md}");
    println!("written: {}/value.{{md,json}}", a.out.display());
    Ok(())
}

fn search(a: BenchSearchArgs) -> anyhow::Result<()> {
    use iro_worker::pipeline::Pipeline;
    use iro_worker::pipeline::efficiency::{
        EfficiencySpec, Guide, efficiency_json, efficiency_markdown, efficiency_png,
    };
    let config = iro_common::RunConfig::load(&a.config)?;
    let shapes = a
        .shapes
        .iter()
        .map(|s| {
            let (w, k) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("--shapes: `{s}` is not WxK"))?;
            Ok((w.trim().parse::<usize>()?, k.trim().parse::<usize>()?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(shapes.iter().all(|&(w, k)| w > 0 && k > 0), "--shapes: W and K must be ≥ 1");
    let guides = if a.guides.is_empty() {
        let mut g = vec![Guide::Constant, Guide::Oracle];
        if a.iteration > 0 {
            g.insert(1, Guide::Value);
        }
        g
    } else {
        a.guides
            .iter()
            .map(|g| match g.as_str() {
                "constant" => Ok(Guide::Constant),
                "value" => Ok(Guide::Value),
                "oracle" => Ok(Guide::Oracle),
                other => anyhow::bail!("--guides: `{other}` is not constant, value or oracle"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let chunk_lengths =
        if a.chunk_lengths.is_empty() { vec![config.search.chunk_length] } else { a.chunk_lengths.clone() };
    let spec = EfficiencySpec {
        iteration: a.iteration,
        prompts: a.prompts,
        best_of: a.best_of,
        shapes,
        chunk_lengths,
        guides,
    };
    let mut pipeline = Pipeline::open(config, a.device.as_deref(), &a.work_dir)?;
    let mut bar = super::progress::Bar::new("bench search");
    let rows = pipeline.sample_efficiency(&spec, |done, total| bar.update(done, total))?;
    bar.finish();
    std::fs::create_dir_all(&a.out)?;
    let md = efficiency_markdown(&rows);
    std::fs::write(a.out.join("search.md"), &md)?;
    std::fs::write(a.out.join("search.json"), efficiency_json(&rows)?)?;
    std::fs::write(a.out.join("search.png"), efficiency_png(&rows))?;
    println!("{md}");
    println!("written: {}/search.{{md,json,png}}", a.out.display());
    Ok(())
}

fn generate(a: BenchGenerateArgs) -> anyhow::Result<()> {
    let python = (!a.no_baseline).then_some(a.python.clone());
    if let Some(p) = &python {
        anyhow::ensure!(
            p.exists(),
            "baseline python {} not found: run scripts/assets/check_smollm2.sh to create it, or pass --no-baseline",
            p.display()
        );
    }
    let cfg = BenchConfig {
        model: a.model,
        batch_sizes: a.batch_sizes,
        new_tokens: a.new_tokens,
        kind: iro_worker::device::parse_dtype(&a.dtype, tch::Device::Cpu)?,
        threads: a.threads,
        repeats: a.repeats,
        sampling: SamplingParams { temperature: 0.7, top_k: 50, top_p: 1.0 },
        python,
        baseline_script: PathBuf::from("scripts/bench/hf_generate.py"),
    };
    let rows = bench::run(&cfg)?;
    println!(
        "batched sampling, {} new tokens/row, {:?}, {} threads, top-k 50, T 0.7 (best of {} alternating rounds)",
        cfg.new_tokens, cfg.kind, cfg.threads, cfg.repeats
    );
    println!("{:>6} {:>14} {:>18} {:>8}", "batch", "iro tok/s", "transformers tok/s", "ratio");
    for r in rows {
        match r.baseline_tokens_per_second {
            Some(b) => println!(
                "{:>6} {:>14.1} {:>18.1} {:>7.2}x",
                r.batch,
                r.ours_tokens_per_second,
                b,
                r.ours_tokens_per_second / b
            ),
            None => println!("{:>6} {:>14.1} {:>18} {:>8}", r.batch, r.ours_tokens_per_second, "-", "-"),
        }
    }
    Ok(())
}
