//! The eval tasks' scoring on the real datasets: HumanEval's canonical solutions through the
//! sandbox (and what the sandbox must contain), GSM8K's gold answers through the filters.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flow_stages::eval::gsm8k;
use flow_stages::eval::humaneval;
use flow_stages::eval::sandbox::{Level, Limits, Outcome, Sandbox};
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
    Sandbox::new(
        Limits {
            timeout: Duration::from_secs(3),
            ..Limits::default()
        },
        Level::Strict,
    )
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
    let with_site = Sandbox::new(
        Limits {
            timeout: Duration::from_secs(10),
            site_packages: true,
            ..Limits::default()
        },
        Level::Strict,
    )
    .unwrap();
    assert_eq!(with_site.run(program).unwrap().outcome, Outcome::Passed);
}

fn first_problem() -> Value {
    jsonl(&shared_data("humaneval/HumanEval.jsonl.gz")).swap_remove(0)
}

/// A program passes only if it ran to its end: exits with status 0 before `check` finished
/// (as a completion of a real problem, and as bare programs) fail, as in OpenAI's
/// human-eval. `exit()` exists only with `site`, so both sandboxes are tried.
#[test]
fn a_program_passes_only_if_it_ran_to_its_end() {
    let p = first_problem();
    let program = |completion: &str| {
        humaneval::program(
            s(&p, "prompt"),
            completion,
            s(&p, "test"),
            s(&p, "entry_point"),
        )
    };
    let with_site = Sandbox::new(
        Limits {
            timeout: Duration::from_secs(10),
            site_packages: true,
            ..Limits::default()
        },
        Level::Strict,
    )
    .unwrap();
    let mut passed = Vec::new();
    for (site, sb) in [(false, sandbox()), (true, with_site)] {
        // The canonical solution passes, and so does one that prints without a newline.
        let canonical = s(&p, "canonical_solution");
        assert_eq!(
            sb.run(&program(canonical)).unwrap().outcome,
            Outcome::Passed
        );
        let chatty = format!("    print('no newline', end='')\n{canonical}");
        assert_eq!(sb.run(&program(&chatty)).unwrap().outcome, Outcome::Passed);
        for completion in [
            "    raise SystemExit\n",
            "    import sys\n    sys.exit(0)\n",
            "    import os\n    os._exit(0)\n",
            "    return True\nexit()\n",
        ] {
            let o = sb.run(&program(completion)).unwrap().outcome;
            if o == Outcome::Passed {
                passed.push(format!("site {site}: completion {completion:?}"));
            }
        }
        for bare in [
            "raise SystemExit\n",
            "import sys\nsys.exit(0)\n",
            "import os\nos._exit(0)\n",
            "exit()\n",
        ] {
            let o = sb.run(bare).unwrap().outcome;
            if o == Outcome::Passed {
                passed.push(format!("site {site}: program {bare:?}"));
            }
        }
    }
    assert!(passed.is_empty(), "early exits passed: {passed:?}");
}

/// Every process a program starts dies with it: children that left the session (`setsid`)
/// or double-forked into daemons are gone when `run` returns, whether the program exited or
/// timed out; and a program that exits while a child still runs is not kept waiting for it.
#[test]
fn the_whole_process_tree_dies_with_the_program() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let sb = sandbox();
    let setsid_child = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n";
    let cases = [
        ("a setsid child, the program exits", setsid_child.to_string(), Outcome::Passed),
        (
            "a setsid child, the program loops",
            format!("{setsid_child}while True:\n    pass\n"),
            Outcome::TimedOut,
        ),
        (
            "a double-forked daemon",
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\nos.wait()\n"
                .to_string(),
            Outcome::Passed,
        ),
        (
            "a child still running when the program exits",
            "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n".to_string(),
            Outcome::Passed,
        ),
    ];
    for (what, program, want) in cases {
        let e = sb.run(&program).unwrap();
        assert_eq!(e.outcome, want, "{what}");
        assert!(!leftover(&e.program), "{what}: a process survived the run");
    }
}

/// Under `strict`, a program reads only its directory and what Python needs: a secret file
/// beside the test, /etc/hostname and this crate's Cargo.toml are out of reach, and
/// `describe` says so.
#[test]
fn strict_limits_reads_to_the_programs_directory_and_python() {
    let sb = sandbox();
    let d = sb.describe();
    assert_eq!(d["level"], "strict");
    assert_eq!(d["reads_limited"], true, "{d}");
    assert!(d["namespaces"].as_str().unwrap().contains("pid"), "{d}");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "hunter2").unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    for path in [secret.as_path(), Path::new("/etc/hostname"), &manifest] {
        assert!(path.exists(), "{}", path.display());
        let program = format!("print(open({:?}).read())\n", path.to_str().unwrap());
        match sb.run(&program).unwrap().outcome {
            Outcome::Failed(why) => assert!(why.contains("PermissionError"), "{why}"),
            other => panic!("read {}: {other:?}", path.display()),
        }
    }
    let e = sb
        .run("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\nimport os\nos.listdir('.')\n")
        .unwrap();
    assert_eq!(e.outcome, Outcome::Passed);
}

/// The `rlimits` level runs programs too, with reads not limited (the way out for programs
/// that must read elsewhere), and says what it has in force.
#[test]
fn rlimits_runs_with_what_the_kernel_allows() {
    let sb = Sandbox::new(Limits::default(), Level::Rlimits).unwrap();
    let d = sb.describe();
    assert_eq!(d["level"], "rlimits");
    assert_eq!(d["reads_limited"], false, "{d}");
    let read = sb.run("open('/etc/hostname').read()\n").unwrap().outcome;
    assert_eq!(read, Outcome::Passed);
    assert_eq!(
        sb.run("assert 1 + 1 == 2\n").unwrap().outcome,
        Outcome::Passed
    );
    assert_ne!(
        sb.run("import sys\nsys.exit(0)\n").unwrap().outcome,
        Outcome::Passed
    );
}

/// A sandbox that cannot start a program fails the stage (Err), never a sample: a missing
/// interpreter at run time, at probe time, and a strict setup that cannot work (an address
/// space too small for Python to start).
#[test]
fn setup_errors_are_errors_not_failed_samples() {
    let missing = PathBuf::from("/nonexistent/python3");
    let run = Sandbox::unprobed(missing.clone(), Limits::default()).run("pass\n");
    match run {
        Err(e) => assert!(e.to_string().contains("/nonexistent/python3"), "{e}"),
        Ok(e) => panic!("a missing interpreter gave an outcome: {:?}", e.outcome),
    }
    assert!(Sandbox::with_python(missing, Limits::default(), Level::Strict).is_err());
    let tiny = Limits {
        memory_bytes: 1 << 20,
        ..Limits::default()
    };
    match Sandbox::new(tiny, Level::Strict) {
        Err(e) => assert!(e.to_string().contains("rlimits"), "{e}"),
        Ok(sb) => panic!("python started in 1 MiB: {}", sb.describe()),
    }
}
