//! Located errors in pipeline files: every problem names file:line:col and the offending
//! text, and validation reports all of them at once.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// A pipeline file's text, kept so that errors can quote it.
#[derive(Debug)]
pub struct SourceFile {
    /// As the user named it on the command line, so error locations are clickable.
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: PathBuf, text: String) -> Arc<Self> {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Arc::new(SourceFile {
            path,
            text,
            line_starts,
        })
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line + 1, col)
    }

    fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len());
        self.text[start..end].trim_end_matches(['\n', '\r'])
    }
}

/// Where a value of the pipeline came from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A byte range in a pipeline file.
    File(Arc<SourceFile>, Range<usize>),
    /// A command-line argument (`--set ...`).
    Arg(Arc<str>),
    /// A kind's default value.
    Default,
}

/// One problem found in a pipeline, with its location.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub origin: Origin,
    pub message: String,
    /// A suggestion ("did you mean `lr`?").
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(origin: &Origin, message: impl Into<String>) -> Self {
        Diagnostic {
            origin: origin.clone(),
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Adds a "did you mean" hint when one of `known` is close to `wrong`.
    pub fn with_suggestion<'a>(
        mut self,
        wrong: &str,
        known: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        if let Some(h) = suggest(wrong, known) {
            self.help = Some(h);
        }
        self
    }

    /// (file, line, col, offending text) for file locations.
    pub fn location(&self) -> Option<(String, usize, usize, String)> {
        match &self.origin {
            Origin::File(src, span) => {
                let (line, col) = src.line_col(span.start);
                let end = span.end.min(src.text.len()).max(span.start);
                let text = src.text[span.start..end].to_string();
                Some((src.path.display().to_string(), line, col, text))
            }
            _ => None,
        }
    }

    /// The machine-readable form printed by `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"event": "error", "message": self.message});
        if let Some((file, line, col, text)) = self.location() {
            v["file"] = file.into();
            v["line"] = line.into();
            v["col"] = col.into();
            v["text"] = text.into();
        } else if let Origin::Arg(arg) = &self.origin {
            v["arg"] = arg.to_string().into();
        }
        if let Some(help) = &self.help {
            v["help"] = help.clone().into();
        }
        v
    }
}

/// Renders like a compiler: location, message, the source line and a caret under the span.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File(src, span) => {
                let (line, col) = src.line_col(span.start);
                writeln!(
                    f,
                    "{}:{line}:{col}: error: {}",
                    src.path.display(),
                    self.message
                )?;
                let text = src.line_text(line);
                let (end_line, end_col) = src.line_col(span.end.max(span.start + 1) - 1);
                let width = if end_line == line {
                    (end_col + 1).saturating_sub(col).max(1)
                } else {
                    text.chars().count().saturating_sub(col - 1).max(1)
                };
                writeln!(f, "{line:>5} | {text}")?;
                write!(f, "      | {}{}", " ".repeat(col - 1), "^".repeat(width))?;
            }
            Origin::Arg(arg) => write!(f, "{arg}: error: {}", self.message)?,
            Origin::Default => write!(f, "error: {}", self.message)?,
        }
        if let Some(help) = &self.help {
            write!(f, "\n      = help: {help}")?;
        }
        Ok(())
    }
}

/// All problems of one pipeline; returned instead of stopping at the first.
#[derive(Debug, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}\n")?;
        }
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in the pipeline; nothing was run",
            if n == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for Diagnostics {}

/// Names for a message ("a, b, c"), or "none".
pub fn names_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// "did you mean" hint among known names, by edit distance.
pub fn suggest<'a>(wrong: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(wrong, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| format!("did you mean `{k}`?"))
}
