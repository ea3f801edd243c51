//! The worker protocol end to end: register, lease, complete; fencing; malformed and unknown input.

use iro_coordinator::driver::ManualClock;
use iro_proto as pb;
use pb::lease_task_response::Outcome;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn one_worker_runs_a_tiny_plan_from_register_to_run_finished() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;

    let registered = client.register_worker(register_request("pod-a")).await.unwrap().into_inner();
    assert_eq!(registered.run_id, "itest");
    let config: serde_json::Value = serde_json::from_str(&registered.run_config_json).unwrap();
    assert_eq!(config["run"]["id"], "itest", "workers learn the run config at registration");
    let worker = registered.worker_id;

    let mut done = Vec::new();
    loop {
        match lease(&mut client, &worker).await {
            Outcome::Task(task) if task.world > 0 => {
                assert_eq!((task.phase.as_str(), task.rank, task.world), ("train", 0, 1));
                let join = pb::JoinGangRequest {
                    worker_id: worker.clone(),
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                    endpoint: "tcp://127.0.0.1:29500".into(),
                };
                let joined = client.join_gang(join).await.unwrap().into_inner().outcome.unwrap();
                let pb::join_gang_response::Outcome::Ready(ready) = joined else { panic!("{joined:?}") };
                assert_eq!(ready.endpoints, vec!["tcp://127.0.0.1:29500".to_owned()]);
                assert!(complete(&mut client, &worker, &task).await.accepted);
                done.push(task.task_id);
            }
            Outcome::Task(task) => {
                assert_eq!(task.attempt, 1);
                assert_eq!(task.lease_deadline_unix_ms, T0 + LEASE_MS, "deadlines come from the coordinator's clock");
                let payload: serde_json::Value = serde_json::from_str(&task.payload_json).unwrap();
                let key = payload["output_key"].as_str().unwrap();
                assert!(key.starts_with("runs/itest/iter-1/") && key.ends_with(".attempt-1.jsonl"), "{key}");
                let response = complete(&mut client, &worker, &task).await;
                assert!(response.accepted, "{response:?}");
                done.push(task.task_id);
            }
            Outcome::RunFinished(true) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(done, ["iter-1/rollout/0", "iter-1/rollout/1", "iter-1/train/0", "iter-1/eval/0"]);
    let report = status(&server).await;
    assert_eq!(report.status, "finished");
    assert_eq!((report.overall_tasks.done, report.overall_tasks.total()), (4, 4));
    assert_eq!(server.run_over().await, iro_coordinator::state::RunStatus::Finished);
    server.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_completion_is_fenced_not_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &ManualClock::new(T0)).await;
    let mut client = client(&server).await;
    let worker = register(&mut client, "pod-a").await;
    let task = take(&mut client, &worker).await;
    assert!(complete(&mut client, &worker, &task).await.accepted);
    let again = complete(&mut client, &worker, &task).await;
    assert!(!again.accepted);
    assert_eq!(again.fence.unwrap().kind, "already_done");
    let report = status(&server).await;
    assert_eq!(report.overall_tasks.done, 1);
    assert_eq!(report.throughput.tasks_accepted, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field_and_apply_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &ManualClock::new(T0)).await;
    let mut client = client(&server).await;
    let worker = register(&mut client, "pod-a").await;
    let task = take(&mut client, &worker).await;
    let before = status(&server).await;

    let bad_task_id =
        pb::CompleteTaskRequest { task_id: "iter-x/rollout/0".into(), ..complete_request(&worker, &task) };
    let empty_worker = pb::CompleteTaskRequest { worker_id: String::new(), ..complete_request(&worker, &task) };
    let bad_worker = pb::CompleteTaskRequest { worker_id: "../etc".into(), ..complete_request(&worker, &task) };
    let zero_attempt = pb::CompleteTaskRequest { attempt: 0, ..complete_request(&worker, &task) };
    let no_key = pb::CompleteTaskRequest { output_key: String::new(), ..complete_request(&worker, &task) };
    let bad_sha = pb::CompleteTaskRequest { sha256: "xyz".into(), ..complete_request(&worker, &task) };
    for (request, field) in [
        (bad_task_id, "task_id"),
        (empty_worker, "worker_id"),
        (bad_worker, "worker_id"),
        (zero_attempt, "attempt"),
        (no_key, "output_key"),
        (bad_sha, "sha256"),
    ] {
        let refused = client.complete_task(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}: {refused:?}");
        assert!(refused.message().starts_with(field), "the message names `{field}`: {}", refused.message());
    }
    let lease = client.lease_task(pb::LeaseTaskRequest { worker_id: String::new() }).await.unwrap_err();
    assert_eq!(lease.code(), Code::InvalidArgument);
    let heartbeat =
        pb::HeartbeatRequest { worker_id: worker.clone(), task_id: "rollout-0".into(), ..Default::default() };
    assert_eq!(client.heartbeat(heartbeat).await.unwrap_err().code(), Code::InvalidArgument);
    let no_resources = pb::RegisterWorkerRequest { resources: None, ..register_request("pod-b") };
    let refused = client.register_worker(no_resources).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("resources"), "{}", refused.message());
    let not_a_gang = pb::JoinGangRequest {
        worker_id: worker.clone(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        endpoint: "tcp://x:1".into(),
    };
    assert_eq!(client.join_gang(not_a_gang).await.unwrap_err().code(), Code::InvalidArgument);

    let after = status(&server).await;
    assert_eq!(after.log.index, before.log.index, "nothing was applied");
    assert_eq!(after.overall_tasks, before.overall_tasks);
    assert_eq!(after.workers, before.workers);
    // The lease is intact: the real completion is still accepted.
    assert!(complete(&mut client, &worker, &task).await.accepted);
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_task_or_worker_is_not_found_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &ManualClock::new(T0)).await;
    let mut client = client(&server).await;
    let worker = register(&mut client, "pod-a").await;
    let task = take(&mut client, &worker).await;
    let before = status(&server).await;

    let unknown_task =
        pb::CompleteTaskRequest { task_id: "iter-9/rollout/0".into(), ..complete_request(&worker, &task) };
    let refused = client.complete_task(unknown_task).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert!(refused.message().contains("iter-9/rollout/0") && refused.message().contains("iteration"), "{refused:?}");

    let shard_out_of_range = pb::FailTaskRequest {
        worker_id: worker.clone(),
        task_id: "iter-1/rollout/7".into(),
        attempt: 1,
        error: "boom".into(),
        released: false,
        retryable: false,
    };
    assert_eq!(client.fail_task(shard_out_of_range).await.unwrap_err().code(), Code::NotFound);

    let stranger = pb::LeaseTaskRequest { worker_id: "w-9999".into() };
    let refused = client.lease_task(stranger).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert!(refused.message().contains("w-9999"), "{refused:?}");

    let after = status(&server).await;
    assert_eq!(after.log.index, before.log.index, "refused commands are not logged");
    assert_eq!(after.overall_tasks, before.overall_tasks);
    assert_eq!(after.recent_rejections.len(), 3, "{:?}", after.recent_rejections);
    assert!(complete(&mut client, &worker, &task).await.accepted);
    server.shutdown().await;
}

#[tokio::test]
async fn a_released_lease_goes_back_without_counting_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &ManualClock::new(T0)).await;
    let mut client = client(&server).await;
    let worker = register(&mut client, "pod-a").await;
    let task = take(&mut client, &worker).await;
    let release = pb::FailTaskRequest {
        worker_id: worker.clone(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        error: "SIGTERM".into(),
        released: true,
        retryable: false,
    };
    let response = client.fail_task(release.clone()).await.unwrap().into_inner();
    assert!(response.accepted && response.will_retry, "{response:?}");
    let again = client.fail_task(release).await.unwrap().into_inner();
    assert!(!again.accepted);
    assert_eq!(again.fence.unwrap().kind, "not_holder");
    let retaken = take(&mut client, &worker).await;
    assert_eq!((retaken.task_id.as_str(), retaken.attempt), (task.task_id.as_str(), 2));
    assert!(status(&server).await.recent_errors.is_empty(), "a release is not an error");
    server.shutdown().await;
}

/// Review A12: a request over the 64 KiB message limit is refused by tonic before any handler runs, so a
/// token holder cannot make the coordinator decode (or log) megabytes per call.
#[tokio::test]
async fn a_request_larger_than_the_message_limit_is_refused_before_it_reaches_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &iro_coordinator::driver::ManualClock::new(T0)).await;
    let mut client = client(&server).await;
    let mut fat = register_request("pod-fat");
    fat.resources.as_mut().unwrap().cached_models = vec!["m".repeat(1024); 100];
    let refused = client.register_worker(fat).await.unwrap_err();
    assert!(
        matches!(refused.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted),
        "a 100 KiB request: {refused:?}"
    );
    assert_eq!(status(&server).await.workers.len(), 0, "nothing was registered");
    assert!(!register(&mut client, "pod-thin").await.is_empty(), "a normal request still gets through");
    server.shutdown().await;
}
