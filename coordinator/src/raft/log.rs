//! raft-rs logs through `slog`; this drain forwards its records to `tracing` (target `raft`), so a
//! replica's elections and step-downs land in the same structured log as everything else. Records are
//! formatted only when tracing would keep them: the simulation runs thousands of elections.

use std::fmt::{self, Write as _};

use slog::{Drain, KV, Level, OwnedKVList, Record};

/// A logger for replica `id`.
pub fn logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => id))
}

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let enabled = match record.level() {
            Level::Critical | Level::Error => tracing::enabled!(target: "raft", tracing::Level::ERROR),
            Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let (message, fields) = (record.msg().to_string(), fields.0);
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", %fields, "{message}"),
            Level::Warning => tracing::warn!(target: "raft", %fields, "{message}"),
            Level::Info => tracing::info!(target: "raft", %fields, "{message}"),
            Level::Debug => tracing::debug!(target: "raft", %fields, "{message}"),
            Level::Trace => tracing::trace!(target: "raft", %fields, "{message}"),
        }
        Ok(())
    }
}

/// slog's key-value pairs as `key=value key=value`.
struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, value: &fmt::Arguments<'_>) -> slog::Result {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{key}={value}");
        Ok(())
    }
}
