//! Progress bars on a terminal; on anything else (a pod's log), a structured log line every 10%.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    phase: String,
    bar: Option<ProgressBar>,
    /// The tenth of the way last logged (none yet: the first update logs, whatever it says).
    last_logged_decile: Option<usize>,
}

impl Bar {
    pub fn new(phase: impl Into<String>) -> Self {
        let phase = phase.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len}  {elapsed_precise} eta {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b.set_prefix(phase.clone());
            b
        });
        Self { phase, bar, last_logged_decile: None }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        match &self.bar {
            Some(b) => {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
            None => {
                let decile = (done * 10).checked_div(total).unwrap_or(10);
                // Updates come once a second in a cluster run: log only when the tenth moves.
                if self.last_logged_decile.is_none_or(|last| decile > last) {
                    self.last_logged_decile = Some(decile);
                    tracing::info!(phase = %self.phase, done, total, "progress");
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// The bar of a cluster run's active stage (its tasks done out of its tasks), drawn from the coordinator's
/// status reports; when the run moves on, the finished stage's bar is completed and a new one starts.
#[derive(Default)]
pub struct StageBars {
    current: Option<((u32, String), Bar)>,
}

impl StageBars {
    pub fn show(&mut self, report: &iro_coordinator::status::StatusReport) {
        let active = report.iteration.zip(report.phase.clone());
        if self.current.as_ref().map(|(key, _)| key) != active.as_ref() {
            if let Some(((t, phase), mut bar)) = self.current.take() {
                // The stage it drew is over: its last counts, as the report still lists them.
                if let Some(s) = report.stages.iter().find(|s| s.iteration == t && s.phase == phase) {
                    bar.update(s.tasks.done as usize, s.tasks.total() as usize);
                }
                bar.finish();
            }
            self.current = active.map(|(t, phase)| ((t, phase.clone()), Bar::new(format!("iter {t} {phase}"))));
        }
        if let Some((_, bar)) = &mut self.current {
            bar.update(report.phase_tasks.done as usize, report.phase_tasks.total() as usize);
        }
    }
}

impl Drop for StageBars {
    fn drop(&mut self) {
        if let Some((_, bar)) = &self.current {
            bar.finish();
        }
    }
}
