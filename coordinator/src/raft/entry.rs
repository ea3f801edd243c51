//! What a Raft entry and a Raft snapshot carry, and how the replica applies an entry to the run state.
//!
//! `Entry.data` is `{"v":1,"cmd":<Command>}`: the serde_json encoding of the existing `Command` (the
//! command log's format, pinned by `state/tests/replay.rs`) inside a versioned envelope, or
//! `{"v":1,"register":{name, resources, now_ms}}` for a registration whose worker id is assigned while
//! applying. `Entry.context` is the 16-byte `ProposalId` the proposer matches replies by. Snapshot data
//! is `{"v":1,"state":<RunState>}`. See `raft/mod.rs` for why JSON and not bincode.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::{Applied, Command, Resources, RunState, WorkerId};

/// The envelope version this build writes and reads. A change to how an entry applies ships as a new
/// version, so that replicas of two builds during a rolling upgrade apply one log alike.
pub const ENTRY_VERSION: u32 = 1;

/// `Entry.data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// A command of the run state machine, stamped by the leader.
    Cmd(Command),
    /// RegisterWorker for a worker that has no id yet: the id is the state's `fresh_worker_id()` where
    /// the entry applies. Picking it when proposing (as the single-process driver does) would give two
    /// registrations in flight the same id, and the second would "restart" the first (review B6.1).
    /// `session`: the registration's nonce, chosen by the proposer (review A6) so every replica applies the same.
    Register {
        name: String,
        resources: Resources,
        now_ms: u64,
        #[serde(default)]
        session: String,
    },
    /// A worker's command sent under the session nonce its RegisterWorker returned: refused with
    /// `StaleSession` where it applies unless that is still the worker's current session. Checked in apply,
    /// not when proposing, so a registration committed in between cannot slip past the check.
    InSession { command: Command, session: String },
}

impl Body {
    pub fn now_ms(&self) -> u64 {
        match self {
            Body::Cmd(command) | Body::InSession { command, .. } => command.now_ms(),
            Body::Register { now_ms, .. } => *now_ms,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Body::Cmd(command) | Body::InSession { command, .. } => command.kind(),
            Body::Register { .. } => "register_worker",
        }
    }
}

pub fn encode(body: &Body) -> Result<Vec<u8>> {
    let envelope = Envelope { v: ENTRY_VERSION, body: body.clone() };
    serde_json::to_vec(&envelope).map_err(|e| Error::Raft { message: format!("an entry does not encode: {e}") })
}

/// The entry's body, or why this build cannot apply it (a newer version, bytes that do not decode).
/// Either is fatal for the replica: skipping an entry others apply would diverge from them.
pub fn decode(index: u64, data: &[u8]) -> Result<Body> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let bad = |message: String| Error::Raft { message: format!("Raft entry {index}: {message}") };
    let version: Version = serde_json::from_slice(data).map_err(|e| bad(format!("does not decode: {e}")))?;
    if version.v != ENTRY_VERSION {
        return Err(bad(format!(
            "envelope version {} but this build applies version {ENTRY_VERSION}: upgrade this replica",
            version.v
        )));
    }
    let envelope: Envelope = serde_json::from_slice(data).map_err(|e| bad(format!("does not decode: {e}")))?;
    Ok(envelope.body)
}

/// Applies one entry's body to `state`: the same on every replica, since it reads nothing but the
/// state and the entry. The command's time is raised to the state's first, as the single-process
/// driver does before logging, so rules that compare the command's own time (a gang candidate's poll)
/// see the time the state uses.
pub fn apply(state: &mut RunState, body: Body) -> Result<Applied> {
    let mut command = match body {
        Body::Cmd(command) => command,
        Body::InSession { command, session } => {
            if let Some(refused) = crate::driver::auth::stale_session(state, &command, Some(&session)) {
                return Err(refused);
            }
            command
        }
        Body::Register { name, resources, now_ms, session } => {
            register_command(state.fresh_worker_id(), name, resources, now_ms, session)
        }
    };
    command.set_now_ms(command.now_ms().max(state.now_ms()));
    state.apply(command)
}

/// The one place this module builds a RegisterWorker; `session` is the nonce the proposer chose (review A6).
pub fn register_command(
    worker_id: WorkerId,
    name: String,
    resources: Resources,
    now_ms: u64,
    session: String,
) -> Command {
    Command::RegisterWorker { worker_id, name, resources, now_ms, session }
}

/// `Entry.context`: which replica proposed the entry and its sequence number there. The replica
/// matches it, with the entry's term, to the caller waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId {
    pub node: u64,
    pub seq: u64,
}

impl ProposalId {
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&self.node.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 16 {
            return None;
        }
        let node = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        let seq = u64::from_le_bytes(bytes[8..].try_into().ok()?);
        Some(Self { node, seq })
    }
}

/// The state-machine version in every snapshot.
pub const SNAPSHOT_VERSION: u32 = 1;

#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    v: u32,
    state: &'a RunState,
}

#[derive(Deserialize)]
struct SnapshotData {
    v: u32,
    state: RunState,
}

pub fn encode_snapshot(state: &RunState) -> Result<Vec<u8>> {
    serde_json::to_vec(&SnapshotDataRef { v: SNAPSHOT_VERSION, state })
        .map_err(|e| Error::Raft { message: format!("the run state does not encode into a snapshot: {e}") })
}

pub fn decode_snapshot(index: u64, data: &[u8]) -> Result<RunState> {
    let bad = |message: String| Error::Raft { message: format!("Raft snapshot at entry {index}: {message}") };
    let data: SnapshotData = serde_json::from_slice(data).map_err(|e| bad(format!("does not decode: {e}")))?;
    if data.v != SNAPSHOT_VERSION {
        return Err(bad(format!("version {} but this build reads version {SNAPSHOT_VERSION}", data.v)));
    }
    Ok(data.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_the_command_json_in_a_versioned_envelope() {
        let command = Command::ExpireLeases { now_ms: 7 };
        let bytes = encode(&Body::Cmd(command.clone())).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text, format!(r#"{{"v":1,"cmd":{}}}"#, serde_json::to_string(&command).unwrap()));
        assert_eq!(decode(3, &bytes).unwrap(), Body::Cmd(command));

        let register =
            Body::Register { name: "n".into(), resources: Resources::default(), now_ms: 9, session: "s".into() };
        assert_eq!(decode(4, &encode(&register).unwrap()).unwrap(), register);

        let in_session = Body::InSession { command: Command::ExpireLeases { now_ms: 2 }, session: "s".into() };
        assert_eq!(decode(6, &encode(&in_session).unwrap()).unwrap(), in_session);

        let newer = br#"{"v":2,"cmd":{"ExpireLeases":{"now_ms":1}}}"#;
        let refused = decode(5, newer).unwrap_err().to_string();
        assert!(refused.contains("entry 5") && refused.contains("version 2"), "{refused}");
    }

    #[test]
    fn proposal_ids_round_trip_and_refuse_other_lengths() {
        let id = ProposalId { node: 3, seq: u64::MAX - 1 };
        assert_eq!(ProposalId::from_bytes(&id.to_bytes()), Some(id));
        assert_eq!(ProposalId::from_bytes(&[0; 15]), None);
        assert_eq!(ProposalId::from_bytes(&[]), None);
    }
}
