//! TLS on both listeners, mTLS for workers, and the read-only status token (review A5), with a CA made at
//! test time: a TLS coordinator refuses plaintext and impostor clients, a worker refuses a coordinator its
//! CA did not issue, and a closed status endpoint answers 401 without one of its tokens.

use iro_coordinator::driver::{Bearer, ClientTls, ClusterToken, ManualClock, ServerHandle, serve};
use iro_coordinator::error::Error;
use iro_coordinator::status::client::{get, get_with};
use iro_proto::coordinator_client::CoordinatorClient;
use tonic::transport::Endpoint;

use crate::pki::Pki;
use crate::support::*;

const STATUS_TOKEN: &str = "status-token-new-0123456789";
const OLD_STATUS_TOKEN: &str = "status-token-old-0123456789";

/// A client over TLS (connecting lazily, so a refused handshake shows on the first call).
fn tls_client(server: &ServerHandle, tls: &ClientTls) -> Client {
    let endpoint = Endpoint::from_shared(server.grpc_url()).unwrap().tls_config(tls.grpc()).unwrap();
    CoordinatorClient::with_interceptor(endpoint.connect_lazy(), Bearer::new(Some(&token())))
}

async fn start_tls(dir: &std::path::Path, clock: &ManualClock, pki: &Pki, mtls: bool) -> ServerHandle {
    let mut config = config(dir, clock);
    config.tls = Some(pki.server_tls(mtls));
    serve(config).await.unwrap()
}

/// What the coordinator applied, through the status endpoint over HTTPS: nothing may move when a refused
/// client calls.
async fn applied(server: &ServerHandle, pki: &Pki) -> (u64, usize) {
    let response = get_with(&server.status_url(), "/status", None, Some(&pki.client_tls())).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let report: iro_coordinator::status::StatusReport = serde_json::from_str(&response.body).unwrap();
    (report.log.index, report.workers.len())
}

#[tokio::test]
async fn a_plaintext_client_is_refused_by_a_tls_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, pki) = (ManualClock::new(T0), Pki::new("iro test CA"));
    let server = start_tls(dir.path(), &clock, &pki, false).await;
    assert!(server.grpc_url().starts_with("https://") && server.status_url().starts_with("https://"));
    let before = applied(&server, &pki).await;

    // The same token, but plaintext: the TLS listener never gets a ClientHello, so no call gets through.
    let plain = format!("http://{}", server.grpc_addr());
    let channel = Endpoint::from_shared(plain).unwrap().connect_lazy();
    let mut plaintext = CoordinatorClient::with_interceptor(channel, Bearer::new(Some(&token())));
    let refused = plaintext.register_worker(register_request("pod-plain")).await;
    assert!(refused.is_err(), "a plaintext call to a TLS coordinator must fail: {refused:?}");
    // Nor does plaintext HTTP reach the status endpoint.
    assert!(get(&format!("http://{}", server.status_addr()), "/status", None).await.is_err());
    assert_eq!(applied(&server, &pki).await, before, "the plaintext call applied nothing");

    // A client over TLS that trusts the CA gets through: the refusal above was the plaintext.
    let mut member = tls_client(&server, &pki.client_tls());
    assert!(!register(&mut member, "pod-tls").await.is_empty());
    assert_eq!(applied(&server, &pki).await.1, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_worker_refuses_a_coordinator_whose_certificate_its_ca_did_not_issue() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, pki, other) = (ManualClock::new(T0), Pki::new("iro test CA"), Pki::new("someone else's CA"));
    let server = start_tls(dir.path(), &clock, &pki, false).await;
    let mut fooled = tls_client(&server, &other.client_tls());
    let refused = fooled.register_worker(register_request("pod-a")).await;
    assert!(refused.is_err(), "the coordinator's certificate does not chain to the worker's CA: {refused:?}");
    assert!(get_with(&server.status_url(), "/status", None, Some(&other.client_tls())).await.is_err());
    assert_eq!(applied(&server, &pki).await.1, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn an_mtls_worker_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, pki) = (ManualClock::new(T0), Pki::new("iro test CA"));
    let server = start_tls(dir.path(), &clock, &pki, true).await;
    let mut worker = tls_client(&server, &pki.client_tls_with_cert(&pki, "pod-a"));
    let id = register(&mut worker, "pod-a").await;
    let task = take(&mut worker, &id).await;
    assert!(complete(&mut worker, &id, &task).await.accepted);
    // The status endpoint asks for no client certificate (scrapers rarely hold one).
    assert_eq!(applied(&server, &pki).await.1, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_worker_without_a_client_certificate_is_refused_under_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, pki, other) = (ManualClock::new(T0), Pki::new("iro test CA"), Pki::new("someone else's CA"));
    let server = start_tls(dir.path(), &clock, &pki, true).await;
    let before = applied(&server, &pki).await;

    // It trusts the coordinator and holds the cluster token, but has no certificate.
    let mut anonymous = tls_client(&server, &pki.client_tls());
    let refused = anonymous.register_worker(register_request("pod-a")).await;
    assert!(refused.is_err(), "no client certificate under mTLS: {refused:?}");
    // A certificate from another CA is no better.
    let mut stranger = tls_client(&server, &other.client_tls_with_cert(&pki, "pod-b"));
    let refused = stranger.register_worker(register_request("pod-b")).await;
    assert!(refused.is_err(), "a client certificate of another CA under mTLS: {refused:?}");
    assert_eq!(applied(&server, &pki).await, before, "neither call applied anything");

    let mut member = tls_client(&server, &pki.client_tls_with_cert(&pki, "pod-c"));
    assert!(!register(&mut member, "pod-c").await.is_empty(), "the CA's own client certificate gets through");
    server.shutdown().await;
}

#[tokio::test]
async fn a_closed_status_endpoint_answers_401_without_its_token_and_200_with_either_rotation_token() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, pki) = (ManualClock::new(T0), Pki::new("iro test CA"));
    let token_file = dir.path().join("status-token");
    std::fs::write(&token_file, format!("{STATUS_TOKEN}\n{OLD_STATUS_TOKEN}\n")).unwrap();
    let mut config = config(&dir.path().join("state"), &clock);
    config.tls = Some(pki.server_tls(false));
    config.status_token = Some(ClusterToken::from_file(&token_file, "status_token_file").unwrap());
    config.status_requires_token = true;
    let server = serve(config).await.unwrap();
    let tls = pki.client_tls();
    let url = server.status_url();
    let status_of = |path: &'static str, token: Option<ClusterToken>| {
        let (url, tls) = (url.clone(), tls.clone());
        async move { get_with(&url, path, token.as_ref(), Some(&tls)).await.unwrap().status }
    };
    let new = ClusterToken::new(STATUS_TOKEN).unwrap();
    let old = ClusterToken::new(OLD_STATUS_TOKEN).unwrap();
    let wrong = ClusterToken::new("not-a-status-token-0123456789").unwrap();
    for path in ["/status", "/metrics", "/"] {
        assert_eq!(status_of(path, None).await, 401, "{path} without a token");
        assert_eq!(status_of(path, Some(wrong.clone())).await, 401, "{path} with a wrong token");
        assert_eq!(status_of(path, Some(new.clone())).await, 200, "{path} with the new status token");
        assert_eq!(status_of(path, Some(old.clone())).await, 200, "{path} with the old status token");
        assert_eq!(status_of(path, Some(token())).await, 200, "{path} with the cluster token");
    }
    for probe in ["/livez", "/readyz"] {
        assert_eq!(status_of(probe, None).await, 200, "{probe} stays open for the kubelet");
    }

    // The status token is read-only: it opens nothing on gRPC.
    let endpoint = Endpoint::from_shared(server.grpc_url()).unwrap().tls_config(tls.grpc()).unwrap();
    let mut scraper = CoordinatorClient::with_interceptor(endpoint.connect_lazy(), Bearer::new(Some(&new)));
    let refused = scraper.register_worker(register_request("pod-scraper")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_status_token_is_refused_where_it_would_open_nothing_or_equal_the_cluster_token() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut open = config(dir.path(), &clock);
    open.status_token = Some(ClusterToken::new(STATUS_TOKEN).unwrap());
    match serve(open).await {
        Err(Error::Config { field: "status_token", message }) => {
            assert!(message.contains("--status-requires-token"), "{message}")
        }
        other => panic!("expected a status_token config error, got {:?}", other.map(|s| s.grpc_addr())),
    }
    let mut same = config(dir.path(), &clock);
    same.status_token = Some(token());
    same.status_requires_token = true;
    match serve(same).await {
        Err(Error::Config { field: "status_token", message }) => assert!(message.contains("different"), "{message}"),
        other => panic!("expected a status_token config error, got {:?}", other.map(|s| s.grpc_addr())),
    }
}
