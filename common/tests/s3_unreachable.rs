//! An S3 endpoint nobody listens on fails fast with an error that names the store, the key and the
//! operation, instead of hanging in retries. All settings are explicit: the environment is not touched.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use iro_common::store::{Store, StoreOptions};

fn closed_port_options(max_retries: usize) -> StoreOptions {
    // Bind and release a port: nothing listens there afterwards, so connections are refused at once.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s3 = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    StoreOptions {
        max_retries,
        retry_timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_millis(10),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        s3_config: vec![
            s3("aws_endpoint", &format!("http://127.0.0.1:{port}")),
            s3("aws_allow_http", "true"),
            s3("aws_access_key_id", "testing"),
            s3("aws_secret_access_key", "testing"),
            s3("aws_region", "us-east-1"),
        ],
        ..StoreOptions::default()
    }
}

#[tokio::test]
async fn unreachable_s3_endpoint_is_a_clear_fast_error() {
    for retries in [0, 2] {
        let store = Store::open_with("s3://iro-test/prefix", &closed_port_options(retries)).unwrap();
        let start = Instant::now();
        let err = store.get("runs/r/iter-1/rollout/manifest.json").await.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        assert_eq!(err.kind(), "store_unreachable", "{err}");
        let text = err.to_string();
        eprintln!("retries={retries}, {:?}: {text}", start.elapsed());
        assert!(
            text.contains("s3://iro-test/prefix") && text.contains("runs/r/iter-1/rollout/manifest.json"),
            "{text}"
        );
        assert!(text.contains("unreachable during get"), "{text}");

        let err = store.put("k", "v").await.unwrap_err();
        assert_eq!(err.kind(), "store_unreachable", "{err}");
        let err = store.list("runs").await.unwrap_err();
        assert_eq!(err.kind(), "store_unreachable", "{err}");
    }
}

#[test]
fn unknown_s3_settings_are_refused_when_opening() {
    let options = StoreOptions { s3_config: vec![("aws_no_such_thing".into(), "1".into())], ..StoreOptions::default() };
    let err = Store::open_with("s3://bucket", &options).unwrap_err();
    assert_eq!(err.kind(), "store_open");
    assert!(err.to_string().contains("aws_no_such_thing"), "{err}");
}
