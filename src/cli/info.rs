//! `iro info` and `iro check-config`: quick checks an operator runs before spending GPU time.

use std::path::Path;

use iro_common::RunConfig;

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

pub fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = RunConfig::load(path)?;
    tracing::info!(path = %path.display(), run_id = %config.run.id, "config is valid");
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(())
}
