//! The cluster token: refused without it, refused with a wrong one, and no unauthenticated listener
//! beyond loopback.

use iro_coordinator::driver::{ClusterToken, ManualClock, serve};
use iro_coordinator::error::Error;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn calls_without_the_token_or_with_a_wrong_one_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &ManualClock::new(T0)).await;
    let before = status(&server).await;

    let mut anonymous = client_with(&server, None).await;
    let refused = anonymous.register_worker(register_request("pod-a")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("authorization"), "{refused:?}");

    let wrong = ClusterToken::new("not-the-cluster-token-42").unwrap();
    let mut impostor = client_with(&server, Some(&wrong)).await;
    let refused = impostor.register_worker(register_request("pod-a")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(!refused.message().contains(TOKEN), "the token is never echoed");

    let after = status(&server).await;
    assert_eq!((after.log.index, after.workers.len()), (before.log.index, 0), "nothing was applied");
    let metrics = http(&server, "/metrics").await.body;
    assert!(metrics.contains("iro_auth_failures_total 2\n"), "{metrics}");

    let mut member = client(&server).await;
    assert!(!register(&mut member, "pod-a").await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn without_a_token_the_coordinator_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut open = config(dir.path(), &clock);
    open.token = None;
    open.listen = "0.0.0.0:0".parse().unwrap();
    match serve(open).await {
        Err(Error::Config { field, message }) => {
            assert_eq!(field, "listen");
            assert!(message.contains("IRO_CLUSTER_TOKEN") && message.contains("loopback"), "{message}");
        }
        other => panic!("expected a config error, got {:?}", other.map(|s| s.grpc_addr())),
    }

    // On loopback it serves without a token, and clients need none.
    let mut local = config(dir.path(), &clock);
    local.token = None;
    let server = serve(local).await.unwrap();
    let mut anonymous = client_with(&server, None).await;
    assert!(!register(&mut anonymous, "pod-a").await.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn the_status_endpoint_is_open_by_default_and_can_require_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    assert_eq!(http(&server, "/status").await.status, 200, "open by default");
    server.shutdown().await;

    let mut guarded = config(dir.path(), &clock);
    guarded.status_requires_token = true;
    let server = serve(guarded).await.unwrap();
    for path in ["/", "/status", "/metrics"] {
        assert_eq!(http(&server, path).await.status, 401, "{path} without the token");
    }
    let wrong = ClusterToken::new("not-the-cluster-token-42").unwrap();
    let url = server.status_url();
    let with = |t| iro_coordinator::status::client::get(&url, "/status", Some(t));
    assert_eq!(with(&wrong).await.unwrap().status, 401);
    assert_eq!(with(&token()).await.unwrap().status, 200);
    server.shutdown().await;
}
