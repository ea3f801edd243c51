//! Gang scheduling of the train task. Workers that lease during the train phase take ranks 0..R in
//! order; each publishes an endpoint through JoinGang (rank 0: the NCCL unique id; every rank: its
//! ring address), and the gang starts once all R have. Losing any rank before the end (expiry, death,
//! FailTask, AbortGang) aborts the whole gang: the train task goes back to Pending, and the next gang,
//! a new attempt, resumes from the last checkpoint rank 0 wrote. A gang that has not gathered all R
//! ranks within the join timeout is aborted with an error saying how many came. A gang forms only once
//! R idle workers are asking for a rank (see `lease_rank`), so it does not form short and time out.

use serde::{Deserialize, Serialize};

use super::command::{Lease, LossCause, Reply, WaitReason};
use super::ids::{TaskId, WorkerId};
use super::tasks::TaskState;
use super::{Event, Held, RunState};
use crate::error::{Error, Result};
use crate::plan::Phase;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gang {
    /// Dense index of the train task.
    pub task: usize,
    pub attempt: u32,
    /// All ranks must have joined by then, counted from rank 0's lease.
    pub join_deadline_ms: u64,
    /// `members[r]` is rank r.
    pub members: Vec<Member>,
    /// All R ranks joined and got the endpoints.
    pub started: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub rank: u32,
    pub worker: WorkerId,
    /// What this rank published through JoinGang.
    pub endpoint: Option<String>,
    pub deadline_ms: u64,
    /// A rank other than 0 reported completion; it no longer holds a lease.
    pub finished: bool,
}

impl Gang {
    pub fn rank_of(&self, worker: &WorkerId) -> Option<u32> {
        self.members.iter().find(|m| &m.worker == worker).map(|m| m.rank)
    }

    pub(super) fn joined(&self) -> u32 {
        self.members.iter().filter(|m| m.endpoint.is_some()).count() as u32
    }
}

impl RunState {
    /// LeaseTask during the train phase: the worker's rank in the forming gang, or a place among the
    /// candidates of the next one.
    ///
    /// A gang forms only once R idle workers can take it (review A9): each idle worker that asks while no
    /// gang is forming becomes a candidate, and once R unquarantined candidates have asked within a worker
    /// timeout, the gang forms with all of them at once (the asking worker and the others by id, ranks in id
    /// order); the others get their rank when they next ask. A gang that forms short of capacity would only
    /// time out, and survivors of an aborted gang, still stopping their collectives, are not asking.
    ///
    /// Liveness is the candidates' own polls, not the workers' last-seen times (which unlogged commands move):
    /// a poll that records a candidate, at most once per heartbeat interval each, is a durable change and is
    /// logged (`changes_only_liveness`), so a replay forms the same gang at the same command.
    pub(super) fn lease_rank(&mut self, worker: &WorkerId) -> Lease {
        let index = self.plan.stage_tasks(self.stage).start;
        let world = self.plan.train_ranks;
        let full = Lease::RetryAfter { ms: self.plan.retry_after_ms, reason: WaitReason::GangFull };
        match &self.gang {
            Some(gang) if gang.started || gang.members.len() as u32 >= world => return full,
            Some(_) => {}
            None => {
                if self.tasks[index].state != TaskState::Pending {
                    return full;
                }
                if self.tasks[index].not_before_ms > self.now_ms {
                    return Lease::RetryAfter { ms: self.plan.retry_after_ms, reason: WaitReason::Backoff };
                }
                let Some(members) = self.gather(worker) else {
                    return Lease::RetryAfter { ms: self.plan.retry_after_ms, reason: WaitReason::GangGathering };
                };
                let attempt = self.tasks[index].attempt + 1;
                self.tasks[index].attempt = attempt;
                self.set_state(index, TaskState::Gang { attempt });
                self.gang = Some(Gang {
                    task: index,
                    attempt,
                    join_deadline_ms: self.now_ms.saturating_add(self.plan.gang_join_timeout_ms),
                    members: Vec::new(),
                    started: false,
                });
                // Every member holds its rank's lease from now; the others hear of it when they next ask.
                // Each counts as seen now: it asked within a worker timeout, but by polls that need not be
                // logged, so the time it was last seen is not the same in a replay. A lease holder's liveness
                // must be (it decides when the lease dies), so it starts over here, alike in both.
                let mut rank = 0;
                for member in &members {
                    self.touch(member);
                    let r = self.add_rank(index, member);
                    if member == worker {
                        rank = r;
                    }
                }
                return self.rank_lease(index, rank);
            }
        }
        let rank = self.add_rank(index, worker);
        self.rank_lease(index, rank)
    }

    /// The lease of `rank` in the forming gang of task `index`.
    fn rank_lease(&self, index: usize, rank: u32) -> Lease {
        let gang = self.gang.as_ref().expect("a gang is forming");
        let (attempt, join_deadline_ms) = (gang.attempt, gang.join_deadline_ms);
        let deadline_ms = gang.members[rank as usize].deadline_ms;
        let task_id = self.plan.task_id(index);
        Lease::GangRank { task_id, attempt, rank, world: self.plan.train_ranks, deadline_ms, join_deadline_ms }
    }

    /// Records `worker` as a candidate of the next gang (unless it asked less than a heartbeat interval
    /// ago), and returns the gang's members in rank order once R fresh candidates are there.
    fn gather(&mut self, worker: &WorkerId) -> Option<Vec<WorkerId>> {
        let now = self.now_ms;
        // At least twice per worker timeout, so that a candidate still asking never looks stale.
        let refresh = self.plan.heartbeat_interval_ms.min(self.plan.worker_timeout_ms / 2).max(1);
        if self.gang_candidates.get(worker).is_none_or(|&asked| asked.saturating_add(refresh) <= now) {
            let timeout = self.plan.worker_timeout_ms;
            // Only while recording (a logged command) are stale candidates dropped, so a replay drops the same.
            self.gang_candidates.retain(|_, asked| asked.saturating_add(timeout) > now);
            self.gang_candidates.insert(worker.clone(), now);
        }
        let world = self.plan.train_ranks as usize;
        let fresh: Vec<&WorkerId> = self
            .gang_candidates
            .iter()
            .filter(|(id, asked)| {
                asked.saturating_add(self.plan.worker_timeout_ms) > now
                    && !self.quarantined(id)
                    && self.workers.get(*id).is_some_and(|w| w.current.is_none())
            })
            .map(|(id, _)| id)
            .collect();
        if fresh.len() < world {
            return None;
        }
        // The asking worker, and the first others by id: a stable choice a replay makes alike.
        let mut members: Vec<WorkerId> =
            fresh.into_iter().filter(|id| *id != worker).take(world - 1).cloned().collect();
        members.push(worker.clone());
        members.sort();
        self.gang_candidates.clear();
        Some(members)
    }

    /// Gives `worker` the next rank of the forming gang (and its lease); returns the rank.
    fn add_rank(&mut self, index: usize, worker: &WorkerId) -> u32 {
        let deadline_ms = self.now_ms.saturating_add(self.plan.lease_ms);
        let gang = self.gang.as_mut().expect("a gang is forming");
        let rank = gang.members.len() as u32;
        gang.members.push(Member { rank, worker: worker.clone(), endpoint: None, deadline_ms, finished: false });
        let attempt = gang.attempt;
        self.deadlines.insert((deadline_ms, index, rank));
        self.hold(worker, Held { task: index, attempt });
        let task_id = self.plan.task_id(index);
        self.events.push(Event::TaskLeased { task: task_id, attempt, worker: worker.clone() });
        rank
    }

    pub(super) fn join_gang(
        &mut self,
        worker: &WorkerId,
        task_id: TaskId,
        attempt: u32,
        endpoint: String,
        now_ms: u64,
    ) -> Result<Reply> {
        self.known(worker)?;
        let index = self.gang_task(task_id)?;
        self.tick(now_ms);
        self.touch(worker);
        if let Err(fenced) = self.fence(worker, index, attempt) {
            return Ok(Reply::Fenced(fenced));
        }
        self.extend(index, worker);
        let world = self.plan.train_ranks;
        let retry_after_ms = self.plan.retry_after_ms;
        let gang = self.gang.as_mut().expect("a fenced gang rank implies a gang");
        let rank = gang.rank_of(worker).expect("a fenced gang rank is a member");
        // Once started, endpoints are frozen: other ranks may already have connected to them.
        if !gang.started {
            gang.members[rank as usize].endpoint = Some(endpoint);
            if gang.members.len() as u32 == world && gang.joined() == world {
                gang.started = true;
                let attempt = gang.attempt;
                self.events.push(Event::GangStarted { task: task_id, attempt, world });
            }
        }
        let gang = self.gang.as_ref().expect("still there");
        Ok(if gang.started {
            let endpoints = gang.members.iter().map(|m| m.endpoint.clone().unwrap_or_default()).collect();
            Reply::GangReady { rank, world, endpoints }
        } else {
            Reply::GangWaiting { joined: gang.joined(), world, retry_after_ms }
        })
    }

    pub(super) fn abort_gang_command(
        &mut self,
        worker: &WorkerId,
        task_id: TaskId,
        attempt: u32,
        reason: &str,
        now_ms: u64,
    ) -> Result<Reply> {
        self.known(worker)?;
        let index = self.gang_task(task_id)?;
        self.tick(now_ms);
        self.touch(worker);
        if let Err(fenced) = self.fence(worker, index, attempt) {
            return Ok(Reply::Fenced(fenced));
        }
        let rank = self.gang.as_ref().and_then(|g| g.rank_of(worker)).unwrap_or(0);
        let message = format!("gang {task_id} attempt {attempt} aborted by rank {rank} (worker {worker}): {reason}");
        let will_retry = self.abort_gang(LossCause::GangAborted, &message, Some(worker));
        Ok(Reply::Returned { task_id, will_retry })
    }

    fn gang_task(&self, task_id: TaskId) -> Result<usize> {
        let index = self.plan.index(task_id)?;
        if task_id.phase != Phase::Train {
            return Err(Error::NotAGangTask { task_id: task_id.to_string() });
        }
        Ok(index)
    }

    /// Ends the gang, takes every rank's lease back, and requeues (or fails) the train task.
    pub(super) fn abort_gang(&mut self, cause: LossCause, message: &str, culprit: Option<&WorkerId>) -> bool {
        let Some(gang) = self.gang.as_ref() else {
            return true;
        };
        let (index, attempt) = (gang.task, gang.attempt);
        self.dissolve_gang();
        let task = self.plan.task_id(index);
        self.events.push(Event::GangAborted { task, attempt, cause, message: message.to_owned() });
        self.requeue_or_fail(index, cause, message, culprit)
    }

    /// Drops the gang and every lease its unfinished ranks hold.
    pub(super) fn dissolve_gang(&mut self) {
        let Some(gang) = self.gang.take() else { return };
        for member in gang.members.iter().filter(|m| !m.finished) {
            self.deadlines.remove(&(member.deadline_ms, gang.task, member.rank));
            self.release_hold(&member.worker);
        }
    }

    /// A rank other than 0 is done: it stops holding a lease, so its later silence aborts nothing.
    pub(super) fn finish_rank(&mut self, worker: &WorkerId, rank: u32) {
        let Some(gang) = self.gang.as_mut() else {
            return;
        };
        let member = &mut gang.members[rank as usize];
        member.finished = true;
        self.deadlines.remove(&(member.deadline_ms, gang.task, rank));
        self.release_hold(worker);
    }
}
