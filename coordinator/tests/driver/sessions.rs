//! Worker sessions (review A6): every registration gets a fresh nonce that the process presents on each
//! later call, and a newer registration under the same worker id replaces it. Two processes that share
//! an id (a pod force-deleted on a partitioned node and its replacement, or a misconfiguration) can then
//! never hold the same lease: the older one's calls are refused, also after a coordinator restart.

use iro_coordinator::driver::{ManualClock, ServerHandle, serve};
use iro_proto as pb;
use pb::lease_task_response::Outcome;
use tonic::{Code, Request};

use crate::support::*;

async fn start_with_sessions(dir: &std::path::Path, clock: &ManualClock) -> ServerHandle {
    let mut config = config(dir, clock);
    config.require_sessions = true;
    serve(config).await.unwrap()
}

fn in_session<T>(session: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("iro-session", session.parse().unwrap());
    request
}

/// Registers `pod-a` under its fixed id, as a pod-named worker does; returns its session.
async fn register_as_pod_a(client: &mut Client) -> String {
    let request = pb::RegisterWorkerRequest { worker_id: "pod-a".into(), ..register_request("pod-a") };
    let registered = client.register_worker(request).await.unwrap().into_inner();
    assert_eq!(registered.worker_id, "pod-a");
    assert_eq!(registered.session.len(), 32, "a 128-bit nonce: {:?}", registered.session);
    registered.session
}

async fn lease_in(client: &mut Client, session: &str) -> Result<Outcome, tonic::Status> {
    let request = in_session(session, pb::LeaseTaskRequest { worker_id: "pod-a".into() });
    client.lease_task(request).await.map(|r| r.into_inner().outcome.unwrap())
}

#[tokio::test]
async fn a_second_process_with_the_same_worker_id_cannot_complete_the_first_ones_lease() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start_with_sessions(dir.path(), &clock).await;
    let mut client = client(&server).await;

    let first = register_as_pod_a(&mut client).await;
    let Outcome::Task(held) = lease_in(&mut client, &first).await.unwrap() else { panic!("a task for pod-a") };
    // The second process registers under the same id: the first one's lease is gone, and so is its session.
    let second = register_as_pod_a(&mut client).await;
    assert_ne!(first, second);
    let Outcome::Task(current) = lease_in(&mut client, &second).await.unwrap() else { panic!("a task") };

    // The first process can neither finish its old lease, nor pick up the second one's (the bug: LeaseTask
    // handed the held lease to whoever named the id, so both wrote the same attempt's key).
    let stale = client.complete_task(in_session(&first, complete_request("pod-a", &held))).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("another process"), "{stale:?}");
    let stale = client.complete_task(in_session(&first, complete_request("pod-a", &current))).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert_eq!(lease_in(&mut client, &first).await.unwrap_err().code(), Code::FailedPrecondition);
    let beat = pb::HeartbeatRequest {
        worker_id: "pod-a".into(),
        task_id: current.task_id.clone(),
        attempt: current.attempt,
        ..Default::default()
    };
    let stale = client.heartbeat(in_session(&first, beat.clone())).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let fail = pb::FailTaskRequest {
        worker_id: "pod-a".into(),
        task_id: current.task_id.clone(),
        attempt: current.attempt,
        error: "boom".into(),
        ..Default::default()
    };
    assert_eq!(client.fail_task(in_session(&first, fail)).await.unwrap_err().code(), Code::FailedPrecondition);
    // Nor can a call without any session.
    let missing = client.complete_task(complete_request("pod-a", &current)).await.unwrap_err();
    assert_eq!(missing.code(), Code::FailedPrecondition);
    assert!(missing.message().contains("iro-session"), "{missing:?}");
    let report = status(&server).await;
    assert_eq!(report.overall_tasks.done, 0, "no refused completion was accepted");

    // The session survives a restart (it is in the log): the second process carries on, the first stays out.
    server.shutdown().await;
    let server = start_with_sessions(dir.path(), &clock).await;
    let mut client = crate::support::client(&server).await;
    assert!(client.heartbeat(in_session(&second, beat)).await.unwrap().into_inner().keep_working);
    assert_eq!(lease_in(&mut client, &first).await.unwrap_err().code(), Code::FailedPrecondition);
    let done = client.complete_task(in_session(&second, complete_request("pod-a", &current))).await.unwrap();
    assert!(done.into_inner().accepted, "the current process's completion is accepted");
    server.shutdown().await;
}

#[tokio::test]
async fn a_malformed_session_is_refused_naming_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start_with_sessions(dir.path(), &clock).await;
    let mut client = client(&server).await;
    register_as_pod_a(&mut client).await;
    let refused = lease_in(&mut client, "not-a-session").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("iro-session"), "{refused:?}");
    server.shutdown().await;
}
