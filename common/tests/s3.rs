//! The store against a real S3-compatible server: `moto_server` (PyPI `moto[server]`, installed into
//! .deps/venv by scripts/moto.sh), started here on a free loopback port and killed when the test ends.
//! Credentials, region and endpoint reach the store through the environment, as in a deployment.
//!
//! This file holds a single test on purpose: it sets environment variables, which is only sound while no
//! other thread of the process reads them.

#[path = "support/moto.rs"]
mod moto;
mod support;

use iro_common::store::Store;
use moto::MotoServer;

#[tokio::test]
async fn s3_store_against_moto_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = MotoServer::start(dir.path());
    server.create_bucket("iro-test");

    // SAFETY: this binary runs this one test, and nothing else in the process reads the environment meanwhile.
    unsafe { server.export_env() };

    let store = Store::open("s3://iro-test/team/exp1").unwrap();
    assert_eq!(store.url(), "s3://iro-test/team/exp1");
    support::basic_contract(&store).await;
    support::manifest_round_trip(&store).await;

    // The prefix is real: seen from the bucket root, every key sits under it.
    let root = Store::open("s3://iro-test").unwrap();
    let keys = root.list("").await.unwrap();
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with("team/exp1/")), "{keys:?}");
    assert!(keys.contains(&"team/exp1/runs/run-7/iter-2/rollout/manifest.json".to_owned()), "{keys:?}");

    // A bucket that does not exist is an error naming the store, not a silent empty answer.
    let missing = Store::open("s3://no-such-bucket").unwrap();
    for err in [missing.put("x", "y").await.unwrap_err(), missing.get("x").await.unwrap_err()] {
        eprintln!("missing bucket: {err}");
        assert_eq!(err.kind(), "store_io", "{err}");
        assert!(err.to_string().contains("s3://no-such-bucket") && err.to_string().contains("bucket does not exist"));
    }

    drop(server);
}
