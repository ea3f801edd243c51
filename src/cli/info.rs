//! `iro info` and `iro check-config`: quick checks an operator runs before spending GPU time.

use std::path::{Path, PathBuf};

use iro_common::RunConfig;
use iro_common::memory::{MemoryPlan, RunShapes};

pub fn run() -> anyhow::Result<()> {
    println!("iro {}", env!("CARGO_PKG_VERSION"));
    println!("{}", iro_worker::device::describe());
    let device = iro_worker::device::parse_device("auto")?;
    // A real tensor op proves libtorch is linked and loadable, not only declared.
    let t = tch::Tensor::arange(4, (tch::Kind::Float, device));
    let sum = t.sum(tch::Kind::Float).double_value(&[]);
    println!("auto device = {device:?}; sum(arange(4)) = {sum}");
    Ok(())
}

pub fn check_config(path: &Path, device_memory_gib: Option<f64>, model_shapes: Option<&Path>) -> anyhow::Result<()> {
    let config = RunConfig::load(path)?;
    tracing::info!(path = %path.display(), run_id = %config.run.id, "config is valid");
    print!("{}", toml::to_string_pretty(&config)?);
    let shapes_dir = model_shapes.map(Path::to_owned).or_else(|| default_shapes(path));
    let shapes = RunShapes::find(&config, shapes_dir.as_deref());
    let gib = device_memory_gib.unwrap_or(config.cluster.device_memory_gib);
    anyhow::ensure!(gib >= 0.0 && gib.is_finite(), "--device-memory-gib {gib} must be a finite number >= 0");
    let plan = MemoryPlan::new(&config, &shapes, (gib * (1u64 << 30) as f64) as u64);
    println!();
    print!("{}", plan.render().lines().map(|l| format!("# {l}\n")).collect::<String>());
    plan.check(path)?;
    Ok(())
}

/// `configs/model-shapes` in the config file's folder or one above it, else under the current folder.
fn default_shapes(config: &Path) -> Option<PathBuf> {
    let start = std::fs::canonicalize(config).ok()?;
    start
        .ancestors()
        .skip(1)
        .map(|d| d.join("configs/model-shapes"))
        .chain(std::iter::once(PathBuf::from("configs/model-shapes")))
        .find(|d| d.is_dir())
}
