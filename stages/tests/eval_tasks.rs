//! The eval tasks' scoring on the real datasets: HumanEval's canonical solutions through the
//! sandbox (and what the sandbox must contain), GSM8K's gold answers through the filters.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flow_stages::eval::gsm8k;
use flow_stages::eval::humaneval;
use flow_stages::eval::sandbox::{Limits, Outcome, Sandbox};
use rayon::prelude::*;
use serde_json::Value;

fn shared_data(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel);
    assert!(p.exists(), "shared test data missing: {}", p.display());
    p
}

fn jsonl(path: &Path) -> Vec<Value> {
    let file = std::fs::File::open(path).unwrap();
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    BufReader::new(reader)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

/// The two sandbox-heavy tests run one at a time: a fork bomb spinning beside the 164
/// canonical solutions would push some of them past their 3 s timeout.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sandbox() -> Sandbox {
    Sandbox::new(Limits {
        timeout: Duration::from_secs(3),
        ..Limits::default()
    })
    .unwrap()
}

fn s<'a>(v: &'a Value, f: &str) -> &'a str {
    v[f].as_str().unwrap()
}

#[test]
fn every_canonical_solution_passes_and_broken_ones_fail() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let problems = jsonl(&shared_data("humaneval/HumanEval.jsonl.gz"));
    assert_eq!(problems.len(), 164);
    let sb = sandbox();
    let canonical = outcomes(&sb, &problems, |p| s(p, "canonical_solution").to_string());
    let failures: Vec<_> = canonical
        .iter()
        .zip(&problems)
        .filter(|(o, _)| **o != Outcome::Passed)
        .map(|(o, p)| format!("{}: {o:?}", s(p, "task_id")))
        .collect();
    assert!(
        failures.is_empty(),
        "canonical solutions failed: {failures:?}"
    );
    // Empty and wrong completions fail, on the first 20 problems.
    for completion in ["", "    return None\n"] {
        let got = outcomes(&sb, &problems[..20], |_| completion.to_string());
        let passed = got.iter().filter(|o| **o == Outcome::Passed).count();
        assert_eq!(
            passed, 0,
            "completion {completion:?} passed {passed} problems"
        );
    }
}

/// Runs every problem with the given completion, in parallel.
fn outcomes(
    sb: &Sandbox,
    problems: &[Value],
    completion: impl Fn(&Value) -> String + Sync,
) -> Vec<Outcome> {
    problems
        .par_iter()
        .map(|p| {
            let c = completion(p);
            let program = humaneval::program(
                s(p, "prompt"),
                humaneval::cut(&c),
                s(p, "test"),
                s(p, "entry_point"),
            );
            sb.run(&program).unwrap().outcome
        })
        .collect()
}

fn leftover(program: &Path) -> bool {
    let needle = program.to_string_lossy().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
            .unwrap_or(false)
    })
}

#[test]
fn the_sandbox_contains_loops_forks_writes_sockets_and_the_environment() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let sb = sandbox();
    // An infinite loop is killed at the timeout.
    let e = sb.run("while True:\n    pass\n").unwrap();
    assert_eq!(e.outcome, Outcome::TimedOut);
    assert!(!leftover(&e.program));

    // A fork bomb: bounded by the process limit, killed as a group, nothing left behind.
    let bomb =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let e = sb.run(bomb).unwrap();
    assert_ne!(e.outcome, Outcome::Passed);
    // Killed processes may take a moment to exit on a loaded machine; none may remain.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !leftover(&e.program)
    });
    assert!(gone, "fork bomb processes survived 10 s after the kill");

    // Writing outside its temp dir fails; writing inside works.
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let e = sb
        .run(&format!(
            "open({:?}, 'w').write('x')\n",
            target.to_str().unwrap()
        ))
        .unwrap();
    assert!(matches!(e.outcome, Outcome::Failed(_)), "{:?}", e.outcome);
    assert!(!target.exists(), "the sandbox wrote outside its directory");
    let e = sb
        .run("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n")
        .unwrap();
    assert_eq!(e.outcome, Outcome::Passed);

    // A socket to a listening server on this machine does not connect.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let e = sb
        .run(&format!(
            "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
        ))
        .unwrap();
    assert!(matches!(e.outcome, Outcome::Failed(_)), "{:?}", e.outcome);
    assert!(
        listener.accept().is_err(),
        "the sandboxed program connected to the host"
    );

    // The environment is scrubbed: the parent's variables are not visible.
    let e = sb
        .run("import os\nassert 'CARGO_MANIFEST_DIR' not in os.environ, os.environ\nassert os.getcwd() == os.environ['HOME']\n")
        .unwrap();
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok() || std::env::var("CARGO").is_ok());
    assert_eq!(e.outcome, Outcome::Passed);

    // A failure reports the exception.
    let e = sb.run("assert 1 == 2, 'nope'\n").unwrap();
    assert_eq!(e.outcome, Outcome::Failed("AssertionError: nope".into()));
}

#[test]
fn gsm8k_gold_answers_score_strict_match_one_on_the_full_test_set() {
    let items = jsonl(&shared_data("gsm8k/test.jsonl"));
    assert_eq!(items.len(), 1319);
    let mut strict = 0;
    let mut flexible = 0;
    for it in &items {
        let answer = s(it, "answer");
        let completion = format!(" {answer}");
        strict += gsm8k::is_correct(&gsm8k::strict_match(&completion), answer) as usize;
        flexible += gsm8k::is_correct(&gsm8k::flexible_extract(&completion), answer) as usize;
    }
    assert_eq!(strict, items.len());
    // The last number of a gold solution is its final answer, so flexible agrees.
    assert_eq!(flexible, items.len());
    // A wrong final answer is not counted.
    let wrong = " 2+2=<<2+2=4>>4\n#### 5";
    assert!(!gsm8k::is_correct(&gsm8k::strict_match(wrong), "#### 4"));
}

/// Programs see the standard library only unless installed packages are asked for: an
/// installed package (tokenizers, which the test setup installs) does not import by
/// default and imports with `site_packages`.
#[test]
fn installed_packages_import_only_when_asked_for() {
    let program = "import json\nimport tokenizers\n";
    let plain = sandbox().run(program).unwrap().outcome;
    match &plain {
        Outcome::Failed(why) => assert!(why.contains("ModuleNotFoundError"), "{why}"),
        other => panic!("imported an installed package without site: {other:?}"),
    }
    let with_site = Sandbox::new(Limits {
        timeout: Duration::from_secs(10),
        site_packages: true,
        ..Limits::default()
    })
    .unwrap();
    assert_eq!(with_site.run(program).unwrap().outcome, Outcome::Passed);
}
