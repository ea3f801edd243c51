//! Progress bars on a terminal; on anything else (a pod's log), a structured log line every 10%.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    phase: String,
    bar: Option<ProgressBar>,
    last_logged_decile: usize,
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
        Self { phase, bar, last_logged_decile: 0 }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        match &self.bar {
            Some(b) => {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
            None => {
                let decile = (done * 10).checked_div(total).unwrap_or(10);
                if decile > self.last_logged_decile || done == 0 {
                    self.last_logged_decile = decile;
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
