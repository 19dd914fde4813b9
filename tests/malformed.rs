//! A corpus of broken pipelines: each names, in `# expect: LINE:COL message` header lines,
//! the errors flow must report (location and text), without running anything or panicking.

mod common;

use common::{Workspace, parse_lines};

#[test]
fn every_malformed_pipeline_is_rejected_with_its_location() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} files", files.len());
    let ws = Workspace::new();
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected: Vec<(usize, usize, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|e| {
                let (loc, msg) = e.split_once(' ').unwrap();
                let (line, col) = loc.split_once(':').unwrap();
                (line.parse().unwrap(), col.parse().unwrap(), msg.to_string())
            })
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no expect line",
            file.display()
        );
        for cmd in ["plan", "run"] {
            let out = ws.flow(&[cmd, file.to_str().unwrap(), "--json"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let name = file.file_name().unwrap().to_string_lossy();
            if out.status.code() != Some(2) || stderr.contains("panicked") {
                failures.push(format!(
                    "{name} ({cmd}): exit {:?}, stderr {stderr}",
                    out.status.code()
                ));
                continue;
            }
            let errors = parse_lines(&out.stdout);
            for (line, col, msg) in &expected {
                let found = errors.iter().any(|e| {
                    e["event"] == "error"
                        && e["line"] == *line
                        && e["col"] == *col
                        && e["message"].as_str().unwrap().contains(msg.as_str())
                        && e["file"].as_str().unwrap().ends_with(name.as_ref())
                });
                if !found {
                    failures.push(format!(
                        "{name}: expected {line}:{col} `{msg}`, got {errors:?}"
                    ));
                }
            }
            // People get the same location and the offending line on stderr.
            let (line, col, _) = &expected[0];
            if !stderr.contains(&format!("{name}:{line}:{col}: error:")) {
                failures.push(format!("{name}: stderr lacks the location: {stderr}"));
            }
        }
    }
    assert!(std::fs::read_dir(ws.cache().join("runs")).map_or(true, |d| d.count() == 0));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
