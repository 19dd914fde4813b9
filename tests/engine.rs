//! The cache and executor through the real binary: skipping, invalidation, healing, resume.

mod common;

use common::{Workspace, parse_lines, statuses, tree, with_status};

const DIAMOND: &str = r#"
[pipeline]
name = "diamond"
seed = 7

[stage.a]
kind = "command"
run = "echo A$FLOW_SEED > $FLOW_OUT/a.txt; seq 1 20000 > $FLOW_OUT/big.txt"

[stage.b]
kind = "command"
run = "cat $FLOW_IN_A/a.txt > $FLOW_OUT/b.txt; echo $X >> $FLOW_OUT/b.txt"
inputs = { a = "a" }
env = { X = "1" }

[stage.c]
kind = "command"
run = "tr a-z A-Z < $FLOW_IN_B/b.txt > $FLOW_OUT/c.txt; echo '{\"lines\": 2}' > $FLOW_OUT/m.json"
inputs = { b = "b" }
metrics = "m.json"

[stage.d]
kind = "command"
run = "wc -l < $FLOW_IN_A/big.txt | tr -d ' ' > $FLOW_OUT/d.txt"
inputs = { a = "a" }
"#;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn cached_rerun_executes_zero_stages_and_keeps_outputs() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    let first = ws.run_statuses(&p, &[]);
    assert_eq!(with_status(&first, "ran"), names(&["a", "b", "c", "d"]));
    let c_out = tree(&ws.output_dir(&p, "c"));
    assert_eq!(c_out[0], ("c.txt".to_string(), b"A7\n1\n".to_vec()));

    let events = ws.json(&["run", p.to_str().unwrap()], true);
    assert_eq!(
        with_status(&statuses(&events), "cached"),
        names(&["a", "b", "c", "d"])
    );
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(
        (summary["ran"].as_u64(), summary["cached"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(tree(&ws.output_dir(&p, "c")), c_out);
    let d = tree(&ws.output_dir(&p, "d"));
    assert_eq!(d[0].1, b"20000\n");
}

#[test]
fn a_param_change_reruns_exactly_the_dependent_subgraph() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    ws.run_statuses(&p, &[]);

    let plan = ws.json(
        &["plan", p.to_str().unwrap(), "--set", "stage.b.env.X=\"2\""],
        true,
    );
    let b = plan.iter().find(|e| e["stage"] == "b").unwrap();
    assert_eq!(b["status"], "would-run");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains(r#"param env: {"X":"1"} -> {"X":"2"}"#),
        "{b}"
    );
    let c = plan.iter().find(|e| e["stage"] == "c").unwrap();
    assert_eq!(c["key"], serde_json::Value::Null);
    assert!(c["reason"].as_str().unwrap().contains("upstream `b`"));

    let second = ws.run_statuses(&p, &["--set", "stage.b.env.X=\"2\""]);
    assert_eq!(with_status(&second, "ran"), names(&["b", "c"]));
    assert_eq!(with_status(&second, "cached"), names(&["a", "d"]));
    let c_out = tree(&ws.output_dir_with(&p, "c", &["--set", "stage.b.env.X=\"2\""]));
    assert_eq!(c_out[0].1, b"A7\n2\n");
    // The pipeline seed is an input of every command stage.
    let third = ws.run_statuses(&p, &["--set", "pipeline.seed=8"]);
    assert_eq!(with_status(&third, "ran"), names(&["a", "b", "c", "d"]));
}

#[test]
fn a_salt_changes_every_key() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    ws.run_statuses(&p, &[]);
    let salted = ws.run_statuses(&p, &["--salt", "again"]);
    assert_eq!(with_status(&salted, "ran").len(), 4);
}

#[test]
fn a_flipped_byte_is_detected_and_healed_when_consumed() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    ws.run_statuses(&p, &[]);
    flip_byte(&ws.output_dir(&p, "a").join("a.txt"));

    // b must run again (new env) and consumes a's damaged output: a is recomputed first.
    let out = ws.flow(&[
        "run",
        p.to_str().unwrap(),
        "--set",
        "stage.b.env.X=\"3\"",
        "--json",
    ]);
    common::assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("damaged"), "{stderr}");
    let s = statuses(&parse_lines(&out.stdout));
    assert!(s.contains(&("a".into(), "ran".into())), "{s:?}");
    let b = ws.output_dir_with(&p, "b", &["--set", "stage.b.env.X=\"3\""]);
    assert_eq!(tree(&b)[0].1, b"A7\n3\n");
    assert_eq!(tree(&ws.output_dir(&p, "a"))[0].1, b"A7\n");
    common::assert_cache_verifies(&ws, "after healing");
}

#[test]
fn healing_two_producers_of_one_damaged_artifact_recomputes_them_in_order() {
    // b copies a, so both outputs are one artifact (same digest); c reads both. Damage found
    // by c names that digest: a and b are both recomputed, and b must wait for a.
    let text = r#"
[pipeline]
name = "twins"

[stage.a]
kind = "command"
run = "echo A > $FLOW_OUT/x.txt"

[stage.b]
kind = "command"
run = "cp $FLOW_IN_A/x.txt $FLOW_OUT/x.txt"
inputs = { a = "a" }

[stage.c]
kind = "command"
run = "cat $FLOW_IN_A/x.txt $FLOW_IN_B/x.txt > $FLOW_OUT/c.txt; echo $N >> $FLOW_OUT/c.txt"
inputs = { a = "a", b = "b" }
env = { N = "1" }
"#;
    let ws = Workspace::new();
    let p = ws.write("p.toml", text);
    ws.run_statuses(&p, &[]);
    assert_eq!(
        ws.output_dir(&p, "a"),
        ws.output_dir(&p, "b"),
        "one artifact"
    );
    flip_byte(&ws.output_dir(&p, "a").join("x.txt"));
    for jobs in ["1", "2"] {
        let n = format!("stage.c.env.N=\"j{jobs}\"");
        let out = ws.flow(&[
            "run",
            p.to_str().unwrap(),
            "--set",
            &n,
            "-j",
            jobs,
            "--json",
        ]);
        common::assert_ok(&out);
        let c = ws.output_dir_with(&p, "c", &["--set", &n]);
        assert_eq!(tree(&c)[0].1, format!("A\nA\nj{jobs}\n").into_bytes());
        if jobs == "1" {
            let s = statuses(&parse_lines(&out.stdout));
            for stage in ["a", "b", "c"] {
                assert!(
                    s.contains(&(stage.into(), "ran".into())),
                    "{stage} ran: {s:?}"
                );
            }
            // Damage it again for the two-slot run.
            flip_byte(&ws.output_dir(&p, "a").join("x.txt"));
        }
    }
    common::assert_cache_verifies(&ws, "after healing twins");
}

#[test]
fn cache_verify_evicts_damaged_objects_and_the_next_run_recomputes() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    ws.run_statuses(&p, &[]);
    let before = tree(&ws.output_dir(&p, "a"));
    flip_byte(&ws.output_dir(&p, "a").join("big.txt"));

    let out = ws.flow(&["cache", "verify", "--json"]);
    assert!(
        !out.status.success(),
        "a damaged cache must not verify clean"
    );
    let report = &parse_lines(&out.stdout)[0];
    assert_eq!(report["bad_objects"].as_array().unwrap().len(), 1);
    assert_eq!(report["evicted_records"].as_array().unwrap().len(), 1);
    assert!(ws.flow(&["cache", "verify"]).status.success());

    let again = ws.run_statuses(&p, &[]);
    assert_eq!(with_status(&again, "ran"), names(&["a"]));
    assert_eq!(tree(&ws.output_dir(&p, "a")), before);
}

#[test]
fn show_refuses_damaged_outputs() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    ws.run_statuses(&p, &[]);
    flip_byte(&ws.output_dir(&p, "d").join("d.txt"));
    let out = ws.flow(&["show", p.to_str().unwrap(), "d"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let again = ws.run_statuses(&p, &[]);
    assert_eq!(with_status(&again, "ran"), names(&["d"]));
}

#[test]
fn scratch_survives_a_failure_and_the_next_run_resumes_from_it() {
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        r#"
[stage.train]
kind = "command"
run = """
if [ -f $FLOW_SCRATCH/ckpt ]; then
  echo resumed-from-$(cat $FLOW_SCRATCH/ckpt) > $FLOW_OUT/model.txt
else
  echo 5 > $FLOW_SCRATCH/ckpt; echo 'simulated crash' >&2; exit 1
fi
"""

[stage.after]
kind = "command"
run = "cp $FLOW_IN_M/model.txt $FLOW_OUT/"
inputs = { m = "train" }

[stage.independent]
kind = "command"
run = "echo ok > $FLOW_OUT/ok"
"#,
    );
    let out = ws.flow(&["run", p.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let s = statuses(&parse_lines(&out.stdout));
    assert_eq!(with_status(&s, "failed"), names(&["train"]));
    assert_eq!(with_status(&s, "blocked"), names(&["after"]));
    assert_eq!(with_status(&s, "ran"), names(&["independent"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("simulated crash"));

    let s = ws.run_statuses(&p, &[]);
    assert_eq!(with_status(&s, "ran"), names(&["after", "train"]));
    assert_eq!(tree(&ws.output_dir(&p, "after"))[0].1, b"resumed-from-5\n");
    let scratch = std::fs::read_dir(ws.cache().join("scratch"))
        .unwrap()
        .count();
    assert_eq!(scratch, 0, "scratch is removed once the run is committed");
}

#[test]
fn sweeps_expand_and_groups_collect_and_fan_out() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", common::FAN_OUT_AND_JOIN);
    let s = ws.run_statuses(&p, &[]);
    let ran = with_status(&s, "ran");
    assert_eq!(
        ran,
        names(&[
            "double[seed=1]",
            "double[seed=2]",
            "double[seed=3]",
            "gen[seed=1]",
            "gen[seed=2]",
            "gen[seed=3]",
            "sum"
        ])
    );
    let all = tree(&ws.output_dir(&p, "sum"));
    assert_eq!(
        String::from_utf8_lossy(&all[0].1),
        "double[seed=1]=2\ndouble[seed=2]=4\ndouble[seed=3]=6\n"
    );
}

#[test]
fn explain_status_dag_and_gc() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", DIAMOND);
    let other = ws.write(
        "other.toml",
        "[stage.x]\nkind = \"command\"\nrun = \"echo x > $FLOW_OUT/x\"\n",
    );
    let ps = p.to_str().unwrap();
    ws.run_statuses(&p, &[]);
    ws.run_statuses(&other, &[]);

    let e = &ws.json(&["explain", ps, "b"], true)[0];
    assert_eq!(e["kind"], "command");
    assert_eq!(e["params"]["env"], r#"{"X":"1"}"#);
    assert_eq!(e["params"]["seed"], "i:7");
    assert_eq!(e["inputs"][0]["from"][0]["stage"], "a");
    assert_eq!(e["done"], true);
    let status = ws.json(&["status", ps], true);
    assert!(status.iter().all(|s| s["status"] == "done"));
    assert!(
        std::path::Path::new(status[0]["outputs"]["out"].as_str().unwrap())
            .join("a.txt")
            .is_file()
    );

    let dot = String::from_utf8(ws.flow(&["dag", ps]).stdout).unwrap();
    assert!(dot.starts_with("digraph \"diamond\""), "{dot}");
    assert_eq!(dot.matches("->").count(), 3, "{dot}");
    let mermaid = String::from_utf8(ws.flow(&["dag", ps, "--format", "mermaid"]).stdout).unwrap();
    assert!(mermaid.contains("s0 -->|inputs.a| s1"), "{mermaid}");

    let dry = ws.json(&["gc", "--keep", ps, "--dry-run"], true);
    assert_eq!(dry[0]["removed"]["records"], 1);
    assert_eq!(
        ws.run_statuses(&other, &[])[0].1,
        "cached",
        "a dry run deletes nothing"
    );
    let gc = ws.json(&["gc", "--keep", ps], true);
    assert_eq!(gc[0]["removed"]["records"], 1);
    assert!(gc[0]["removed"]["objects"].as_u64().unwrap() >= 1);
    assert_eq!(with_status(&ws.run_statuses(&p, &[]), "cached").len(), 4);
    assert_eq!(ws.run_statuses(&other, &[])[0].1, "ran");
    assert!(ws.flow(&["cache", "verify"]).status.success());
}

#[test]
fn two_pipelines_share_a_stage_result() {
    let ws = Workspace::new();
    let stage = "[stage.shared]\nkind = \"command\"\nrun = \"echo s > $FLOW_OUT/s\"\n";
    let p1 = ws.write("one.toml", &format!("[pipeline]\nname = \"one\"\n{stage}"));
    let p2 = ws.write("two.toml", &format!("[pipeline]\nname = \"two\"\n{stage}"));
    assert_eq!(ws.run_statuses(&p1, &[])[0].1, "ran");
    assert_eq!(ws.run_statuses(&p2, &[])[0].1, "cached");
}

#[test]
fn profiles_and_sets_overlay_the_file() {
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        r#"
[stage.a]
kind = "command"
run = "echo $V > $FLOW_OUT/v"
env = { V = "default" }

[profile.big]
"stage.a.env" = { V = "big" }
"#,
    );
    let ps = p.to_str().unwrap();
    ws.run_statuses(&p, &[]);
    ws.run_statuses(&p, &["--profile", "big"]);
    assert_eq!(
        tree(&ws.output_dir(&p, "a"))[0].1,
        b"default\n",
        "show without the profile"
    );
    let v = ws.json(&["show", ps, "a", "--profile", "big"], true);
    let dir = std::path::PathBuf::from(v[0]["output"].as_str().unwrap());
    assert_eq!(std::fs::read(dir.join("v")).unwrap(), b"big\n");

    let out = ws.flow(&["plan", ps, "--profile", "huge"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no profile `huge` in the pipeline (profiles: big)")
    );
    let out = ws.flow(&["plan", ps, "--set", "stage.a.nope=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--set stage.a.nope=1: error: unknown param `nope`")
    );
}

/// `[executor] jobs` runs independent stages side by side, and the cores are shared: two
/// stages started together split them, a stage running alone gets them all; `-j` overrides
/// the file and `--threads` fixes the count.
#[test]
fn stages_started_together_share_the_cores_and_a_lone_stage_gets_them_all() {
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        r#"
[executor]
jobs = 2

[stage.a]
kind = "command"
run = "echo $FLOW_THREADS > $FLOW_OUT/t; sleep 0.3"
env = { RUN = "1" }

[stage.b]
kind = "command"
run = "echo $FLOW_THREADS > $FLOW_OUT/t; sleep 0.3"

[stage.c]
kind = "command"
run = "echo $FLOW_THREADS > $FLOW_OUT/t"
inputs = { a = "a", b = "b" }
"#,
    );
    let threads = |ws: &Workspace, p: &std::path::Path, stage: &str| -> usize {
        let t = tree(&ws.output_dir(p, stage));
        String::from_utf8_lossy(&t[0].1).trim().parse().unwrap()
    };
    ws.run_statuses(&p, &[]);
    let cores = std::thread::available_parallelism().unwrap().get();
    let (a, b, c) = (
        threads(&ws, &p, "a"),
        threads(&ws, &p, "b"),
        threads(&ws, &p, "c"),
    );
    assert_eq!(c, cores, "the join runs alone");
    assert_eq!(a + b, cores.max(2), "a and b split the cores: {a} + {b}");
    assert!(a.abs_diff(b) <= 1, "an even split: {a} and {b}");

    // -j 1 runs one at a time: each stage alone, on every core.
    let p1 = ws.write(
        "p1.toml",
        &std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"1\"", "\"2\""),
    );
    ws.run_statuses(&p1, &["-j", "1"]);
    assert_eq!(threads(&ws, &p1, "a"), cores);
    // --threads fixes it.
    let p3 = ws.write(
        "p3.toml",
        &std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"1\"", "\"3\""),
    );
    ws.run_statuses(&p3, &["--threads", "3"]);
    assert_eq!(threads(&ws, &p3, "a"), 3);

    // A bad value names the field.
    let bad = ws.write(
        "bad.toml",
        "[executor]\njobs = 0\n[stage.a]\nkind = \"command\"\nrun = \"true\"\n",
    );
    let out = ws.flow(&["plan", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("executor.jobs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_new_key_with_identical_output_replaces_a_damaged_copy() {
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        "[stage.one]\nkind = \"command\"\nrun = \"echo same > $FLOW_OUT/f\"\nenv = { Z = \"1\" }\n",
    );
    ws.run_statuses(&p, &[]);
    flip_byte(&ws.output_dir(&p, "one").join("f"));
    // Another key (different env) produces the same bytes: its artifact must be intact.
    let s = ws.run_statuses(&p, &["--set", "stage.one.env.Z=\"2\""]);
    assert_eq!(with_status(&s, "ran"), names(&["one"]));
    let dir = ws.output_dir_with(&p, "one", &["--set", "stage.one.env.Z=\"2\""]);
    assert_eq!(tree(&dir)[0].1, b"same\n");
}

/// Flips one byte of a cached file in place (the file is a hard link to its blob).
fn flip_byte(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();
}

/// A generated pipeline of `n` trivial command stages: a binary tree (stage i reads stage
/// (i-1)/2) when `tree`, else `n` independent stages feeding one join. Each stage writes
/// its input's lines and then its own number: its path from the root.
fn generated(n: usize, tree: bool) -> String {
    let mut text = format!("[pipeline]\nname = \"gen{n}\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "\n[stage.s{i}]\nkind = \"command\"\n\
             run = \"{{ cat $FLOW_IN_UP/v 2>/dev/null; echo {i}; }} > $FLOW_OUT/v\"\n"
        ));
        if tree && i > 0 {
            text.push_str(&format!("inputs = {{ up = \"s{}\" }}\n", (i - 1) / 2));
        }
    }
    if !tree {
        let all: Vec<String> = (0..n).map(|i| format!("\"s{i}\"")).collect();
        text.push_str(&format!(
            "\n[stage.join]\nkind = \"command\"\nrun = \"ls $FLOW_IN_ALL | wc -l > $FLOW_OUT/n\"\n\
             inputs = {{ all = [{}] }}\n",
            all.join(", ")
        ));
    }
    text
}

/// The `--json` summary line of a run.
fn run_summary(ws: &Workspace, pipeline: &std::path::Path, jobs: &str) -> serde_json::Value {
    let events = ws.json(&["run", pipeline.to_str().unwrap(), "-j", jobs], true);
    let summary = events.last().expect("a summary").clone();
    assert_eq!(summary["event"], "summary", "{summary}");
    summary
}

#[test]
fn every_key_is_computed_once_per_run_even_with_the_job_slots_full() {
    // 40 independent stages and a join on one job slot: the old executor recomputed the
    // key of every ready stage that found no slot, each time a stage finished (~800 keys).
    let ws = Workspace::new();
    let p = ws.write("wide.toml", &generated(40, false));
    let cold = run_summary(&ws, &p, "1");
    assert_eq!(cold["ran"], 41, "{cold}");
    assert_eq!(cold["keys_computed"], 41, "one key per stage, cold: {cold}");
    let warm = run_summary(&ws, &p, "1");
    assert_eq!(warm["cached"], 41, "{warm}");
    assert_eq!(warm["keys_computed"], 41, "one key per stage, warm: {warm}");
    let join = tree(&ws.output_dir(&p, "join"));
    assert_eq!(join[0].1, b"40\n", "the join saw every input");

    // A failure blocks exactly its descendants, once each, and the rest still runs.
    let text = DIAMOND.replace("echo $X >> $FLOW_OUT/b.txt", "exit 3");
    let p = ws.write("failing.toml", &text);
    let events = ws.json(&["run", p.to_str().unwrap(), "-j", "1"], false);
    let s = statuses(&events);
    assert_eq!(with_status(&s, "failed"), names(&["b"]));
    assert_eq!(with_status(&s, "blocked"), names(&["c"]));
    assert_eq!(s.len(), 4, "one final status per stage: {s:?}");
    let summary = events.last().unwrap();
    assert_eq!(summary["keys_computed"], 3, "c never gets a key: {summary}");
}

#[test]
fn twenty_thousand_stages_run_cold_and_warm_with_one_key_computation_each() {
    let n = 20_000;
    let ws = Workspace::new();
    let p = ws.write("tree.toml", &generated(n, true));
    let cold = run_summary(&ws, &p, "8");
    assert_eq!(
        (cold["ran"].as_u64(), cold["failed"].as_u64()),
        (Some(n as u64), Some(0))
    );
    assert_eq!(cold["keys_computed"], n, "{cold}");
    let warm = run_summary(&ws, &p, "8");
    assert_eq!(
        (warm["ran"].as_u64(), warm["cached"].as_u64()),
        (Some(0), Some(n as u64))
    );
    assert_eq!(warm["keys_computed"], n, "{warm}");
    // The last stage's output is its path from the root: every input reached its consumer.
    let mut path = vec![n - 1];
    while let Some(&i) = path.last().filter(|i| **i > 0) {
        path.push((i - 1) / 2);
    }
    let want: String = path.iter().rev().map(|i| format!("{i}\n")).collect();
    let last = tree(&ws.output_dir(&p, &format!("s{}", n - 1)));
    assert_eq!(String::from_utf8_lossy(&last[0].1), want);
}

/// Whether a process is gone (reaped, or a zombie waiting for a reaper that may never
/// come in a container whose init does not reap).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Waits (up to 20 s: killed processes take a moment on a loaded machine) for a pid.
fn gone_soon(pid: i32) -> bool {
    (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        process_gone(pid)
    })
}

/// A command stage's children run in the stage's own process group, which is killed when
/// the stage ends and when flow dies, even by `kill -9` of flow alone: a backgrounded
/// child used to survive both (`PR_SET_PDEATHSIG` reached only `sh`) and kept writing
/// while the rerun wrote the same scratch directory.
#[test]
fn a_command_stages_background_children_die_with_the_stage_and_with_a_killed_flow() {
    // The stage ends while its child runs on.
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        "[stage.a]\nkind = \"command\"\nrun = \"sleep 300 & echo $! > bg.pid; echo ok > $FLOW_OUT/o\"\n",
    );
    common::assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let pid: i32 = std::fs::read_to_string(ws.path().join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(gone_soon(pid), "the background child outlived its stage");

    // flow is killed while the stage and its child run.
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        "[stage.a]\nkind = \"command\"\nrun = \"sleep 300 & echo $! > bg.tmp; mv bg.tmp bg.pid; sleep 300\"\n",
    );
    let mut cmd = ws.command(&["run", p.to_str().unwrap()]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid_file = ws.path().join("bg.pid");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !pid_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stage never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Only flow itself: its stage process and the stage's processes must follow.
    child.kill().unwrap();
    let _ = child.wait();
    let survived = !gone_soon(pid);
    if survived {
        // SAFETY: kill(2) of the test's own leftover.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(!survived, "a background child outlived a kill -9 of flow");
}
