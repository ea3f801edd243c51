//! Names of the things the run state tracks: workers (chosen by the driver) and tasks (derived from the
//! plan). Both travel in the command log and on the wire, so their text forms are stable.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;
use crate::plan::Phase;

/// A worker's id. The driver picks it before the RegisterWorker command is logged (ids must be in the
/// log, not invented while applying, or a replay could not route later commands to the same worker).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Ids end up in metric labels and log lines: same rule as object-key segments.
    pub(crate) fn check(&self) -> Result<(), Error> {
        iro_common::layout::check_id("worker id", &self.0).map_err(|e| Error::InvalidWorkerId {
            value: self.0.clone(),
            message: match e {
                iro_common::Error::InvalidId { message, .. } => message,
                other => other.to_string(),
            },
        })
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for WorkerId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

/// One task of the plan: shard `shard` of `phase` in iteration `iteration` (1-based, as in `iter-{t}`).
/// The train phase has a single task, shard 0, run by a gang of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId {
    pub iteration: u32,
    #[serde(with = "phase_serde")]
    pub phase: Phase,
    pub shard: u32,
}

impl TaskId {
    pub fn new(iteration: u32, phase: Phase, shard: u32) -> Self {
        Self { iteration, phase, shard }
    }
}

/// `iter-1/rollout/7`: the form used in the proto's `task_id` strings and in error messages.
impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iter-{}/{}/{}", self.iteration, phase_name(self.phase), self.shard)
    }
}

impl FromStr for TaskId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |message: &str| Error::InvalidTaskId { value: s.to_owned(), message: message.to_owned() };
        let mut parts = s.split('/');
        let (Some(iter), Some(phase), Some(shard), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("expected `iter-{t}/{phase}/{shard}`"));
        };
        let iteration = iter
            .strip_prefix("iter-")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid("iteration must be `iter-` followed by a number"))?;
        let phase = parse_phase(phase).ok_or_else(|| invalid("phase must be rollout, train or eval"))?;
        let shard = shard.parse().map_err(|_| invalid("shard must be a number"))?;
        Ok(Self { iteration, phase, shard })
    }
}

/// The lower-case name used in JSON, task ids and the proto's `phase` field.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Rollout => "rollout",
        Phase::Train => "train",
        Phase::Eval => "eval",
    }
}

pub fn parse_phase(name: &str) -> Option<Phase> {
    match name {
        "rollout" => Some(Phase::Rollout),
        "train" => Some(Phase::Train),
        "eval" => Some(Phase::Eval),
        _ => None,
    }
}

/// `plan::Phase` carries no serde derives; this keeps its wire form (`"rollout"`, ...) in one place.
pub(crate) mod phase_serde {
    use super::*;

    pub fn serialize<S: Serializer>(phase: &Phase, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(phase_name(*phase))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        let name = String::deserialize(d)?;
        parse_phase(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown phase `{name}`")))
    }

    pub fn serialize_opt<S: Serializer>(phase: &Option<Phase>, s: S) -> Result<S::Ok, S::Error> {
        match phase {
            Some(p) => s.serialize_some(phase_name(*p)),
            None => s.serialize_none(),
        }
    }
}
