//! What `flow run` shows: JSON lines on stdout for scripts (`--json`), or progress bars and
//! one line per finished stage on stderr for people.

use std::collections::HashMap;
use std::io::{BufWriter, Stdout, Write};
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

/// Above this many stages a run shows counts, not a line per stage that ran or was
/// blocked (failures are always shown; `--verbose` shows every line), as Bazel does.
pub const MANY_STAGES: usize = 200;

/// One `--json` line per stage (`{"event":"stage",...}`, fields in the order `json!` wrote).
#[derive(serde::Serialize)]
struct StageLine<'a> {
    event: &'static str,
    key: Option<&'a str>,
    stage: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

/// Terminal or JSON reporting for a run.
pub struct Ui {
    json: bool,
    verbose: bool,
    multi: MultiProgress,
    /// One spinner or bar per running stage (at most `-j` of them).
    bars: HashMap<String, ProgressBar>,
    /// Stages done, failed or blocked out of the run's total, with the running count.
    overall: Option<ProgressBar>,
    total: usize,
    finished: usize,
    /// JSON lines, written out before the run waits on a stage and at the end: one write
    /// per batch instead of one per line when thousands of stages are found cached.
    out: BufWriter<Stdout>,
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
            overall: None,
            total: 0,
            finished: 0,
            out: BufWriter::with_capacity(1 << 16, std::io::stdout()),
        }
    }

    /// How many stages this run looks at: the denominator of the overall progress.
    pub fn set_total(&mut self, total: usize) {
        self.total = total;
    }

    /// Writes out buffered JSON lines (before blocking, so that readers see events live).
    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }

    /// Whether per-stage lines are folded into counts (see [`MANY_STAGES`]).
    fn at_scale(&self) -> bool {
        self.total > MANY_STAGES && !self.verbose
    }

    /// The overall bar's message: how many run now, and the first of their names.
    fn update_overall(&self) {
        if let Some(bar) = &self.overall {
            bar.set_position(self.finished as u64);
            let mut names: Vec<&str> = self.bars.keys().map(String::as_str).collect();
            names.sort_unstable();
            let shown = names.len().min(3);
            let more = if names.len() > shown { ", ..." } else { "" };
            bar.set_message(format!(
                "{} running: {}{more}",
                names.len(),
                names[..shown].join(", ")
            ));
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
    pub fn json_line(&mut self, value: &serde_json::Value) {
        if self.json {
            let _ = writeln!(self.out, "{value}");
        }
    }

    /// A stage's final status in this run.
    pub fn stage(&mut self, name: &str, status: Status, key: Option<&str>, detail: &str) {
        if let Some(bar) = self.bars.remove(name) {
            bar.finish_and_clear();
        }
        if self.json {
            // Serialized from a struct, not a `json!` map: a no-op run of 100,000 stages
            // spent 13% of its time building and dropping those maps.
            let line = StageLine {
                event: "stage",
                key,
                stage: name,
                status: status.as_str(),
                detail: matches!(status, Status::Failed).then_some(detail),
            };
            let _ = serde_json::to_writer(&mut self.out, &line);
            let _ = self.out.write_all(b"\n");
        }
        self.finished += 1;
        let quiet = match status {
            Status::Cached => !self.verbose,
            Status::Ran | Status::Blocked => self.at_scale(),
            Status::Failed | Status::WouldRun => false,
        };
        self.update_overall();
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
        if self.overall.is_none() && self.total > 1 {
            let bar = self.multi.add(ProgressBar::new(self.total as u64));
            bar.set_style(
                ProgressStyle::with_template("[{pos}/{len} stages] [{elapsed}] {msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            self.overall = Some(bar);
        }
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.bars.insert(name.to_string(), bar);
        self.update_overall();
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
    /// Final counts, with the keys this process computed (one per stage looked at: tests
    /// hold the scheduler to it).
    pub fn summary(&mut self, ran: usize, cached: usize, failed: usize, blocked: usize, secs: f64) {
        if let Some(bar) = self.overall.take() {
            bar.finish_and_clear();
        }
        self.json_line(&serde_json::json!({
            "event": "summary", "ran": ran, "cached": cached, "failed": failed, "blocked": blocked,
            "keys_computed": crate::exec::plan::keys_computed(),
        }));
        self.flush();
        let mut line = format!("{ran} ran, {cached} cached, {failed} failed");
        if blocked > 0 {
            line.push_str(&format!(", {blocked} blocked"));
        }
        self.note(&format!("{line} in {secs:.2}s"));
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.flush();
    }
}
