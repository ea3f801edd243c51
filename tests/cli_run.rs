//! `iro run` as a user runs it: the whole loop on the tiny fixtures prints the results table and writes the
//! report; running it again resumes (nothing to do); the same run id with a changed config is refused, naming
//! both files, so one run directory never mixes two configs.

#[path = "../worker/tests/support/tiny_run.rs"]
mod tiny_run;

use std::path::Path;
use std::process::Command;

use iro_common::config::Baseline;

fn iro_run(config: &Path, work: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iro"))
        .args(["run", config.to_str().unwrap(), "--work-dir", work.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn iro_run_prints_the_table_resumes_and_refuses_a_changed_config() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut c = tiny_run::tiny_run("cli", &store.display().to_string(), 1);
    c.baselines.methods = vec![Baseline::Base];
    let path = dir.path().join("run.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    let work = dir.path().join("work");

    let first = iro_run(&path, &work);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(stdout.contains("| base | 4 |") && stdout.contains("| iro iter 1 | 4 |"), "{stdout}");
    assert!(store.join("runs/cli/report/summary.md").exists());
    assert!(store.join("runs/cli/config.toml").exists());

    let again = iro_run(&path, &work);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming run"));

    c.run.seed += 1;
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    let refused = iro_run(&path, &work);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("differs from the config run `cli` was started with") && stderr.contains("run.toml"),
        "{stderr}"
    );
}
