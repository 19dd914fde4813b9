//! What `flow run` shows: JSON lines on stdout for scripts (`--json`), or progress bars and
//! one line per finished stage on stderr for people.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::key::short;

/// Outcome of one stage in a run or plan, as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ran,
    Cached,
    Failed,
    /// Not run because an upstream stage failed.
    Blocked,
    WouldRun,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::Failed => "failed",
            Status::Blocked => "blocked",
            Status::WouldRun => "would-run",
        }
    }
}

/// Terminal or JSON reporting for a run.
pub struct Ui {
    json: bool,
    verbose: bool,
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl Ui {
    pub fn new(json: bool, verbose: bool) -> Ui {
        let target = if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Ui {
            json,
            verbose,
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
        }
    }

    /// A line for people, printed above the progress bars (stderr; silent with --json).
    pub fn note(&self, line: &str) {
        if !self.json {
            self.warn(line);
        }
    }

    /// Problems people must see even with --json (stdout stays machine-readable).
    pub fn warn(&self, text: &str) {
        if self.multi.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    /// Prints one JSON object per line on stdout (only with --json).
    pub fn json_line(&self, value: &serde_json::Value) {
        if self.json {
            println!("{value}");
        }
    }

    /// A stage's final status in this run.
    pub fn stage(&mut self, name: &str, status: Status, key: Option<&str>, detail: &str) {
        if let Some(bar) = self.bars.remove(name) {
            bar.finish_and_clear();
        }
        self.json_line(&serde_json::json!({
            "event": "stage", "stage": name, "status": status.as_str(), "key": key,
        }));
        let quiet = matches!(status, Status::Cached) && !self.verbose;
        if !quiet {
            let k = key.map(short).unwrap_or("-");
            self.note(&format!("{:>9}  {name}  {k}  {detail}", status.as_str()));
        }
    }

    /// A stage process started: show a spinner until it reports a length.
    pub fn started(&mut self, name: &str) {
        if self.json {
            return;
        }
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.bars.insert(name.to_string(), bar);
    }

    pub fn progress(&mut self, name: &str, len: Option<u64>, pos: Option<u64>, msg: Option<&str>) {
        let Some(bar) = self.bars.get(name) else {
            return;
        };
        if let Some(len) = len {
            bar.set_length(len);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} [{elapsed}] {wide_bar} {pos}/{len} eta {eta} {msg}",
                )
                .expect("valid template"),
            );
        }
        if let Some(pos) = pos {
            bar.set_position(pos);
        }
        if let Some(msg) = msg {
            bar.set_message(msg.to_string());
        }
    }

    pub fn waiting(&mut self, name: &str, holder: &str) {
        let line =
            format!("  waiting  {name}: another flow process ({holder}) is running this key");
        if let Some(bar) = self.bars.get(name) {
            bar.set_message(format!("waiting for {holder}"));
        }
        self.warn(&line);
    }

    /// Final counts.
    pub fn summary(&self, ran: usize, cached: usize, failed: usize, blocked: usize, secs: f64) {
        self.json_line(&serde_json::json!({
            "event": "summary", "ran": ran, "cached": cached, "failed": failed, "blocked": blocked,
        }));
        let mut line = format!("{ran} ran, {cached} cached, {failed} failed");
        if blocked > 0 {
            line.push_str(&format!(", {blocked} blocked"));
        }
        self.note(&format!("{line} in {secs:.2}s"));
    }
}
