//! Killing `flow run` at random moments never leaves a cache from which a rerun fails or
//! gives different outputs; two runs on one cache execute each key once.

mod common;

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::{Workspace, statuses, tree, with_status};

/// Fan-out and join, several files per stage (one of 2 MB), small sleeps so kills land
/// inside stages as well as between them.
const PIPELINE: &str = r#"
[stage.src]
kind = "command"
run = "sleep 0.1; seq 1 300000 > $FLOW_OUT/big.txt; mkdir -p $FLOW_OUT/sub; echo src > $FLOW_OUT/sub/id"

[stage.left]
kind = "command"
run = "sleep 0.15; grep -c 7 $FLOW_IN_S/big.txt > $FLOW_OUT/n; cp $FLOW_IN_S/big.txt $FLOW_OUT/copy.txt"
inputs = { s = "src" }

[stage.right]
kind = "command"
run = "sleep 0.1; tail -n 5 $FLOW_IN_S/big.txt > $FLOW_OUT/t; sleep 0.1; echo done >> $FLOW_OUT/t"
inputs = { s = "src" }

[stage.join]
kind = "command"
run = "sleep 0.1; cat $FLOW_IN_L/n $FLOW_IN_R/t > $FLOW_OUT/joined"
inputs = { l = "left", r = "right" }

[stage.ckpt]
kind = "command"
run = """
n=$(cat $FLOW_SCRATCH/step 2>/dev/null || echo 0)
while [ $n -lt 5 ]; do n=$((n+1)); sleep 0.05; echo $n > $FLOW_SCRATCH/step.tmp; mv $FLOW_SCRATCH/step.tmp $FLOW_SCRATCH/step; done
cat $FLOW_IN_J/joined > $FLOW_OUT/final; echo steps=$n >> $FLOW_OUT/final
"""
inputs = { j = "join" }
"#;

const STAGES: [&str; 5] = ["src", "left", "right", "join", "ckpt"];

fn outputs(ws: &Workspace, p: &std::path::Path) -> Vec<Vec<(String, Vec<u8>)>> {
    STAGES.iter().map(|s| tree(&ws.output_dir(p, s))).collect()
}

/// A small deterministic generator (the trials are reproducible).
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[test]
fn kill_at_random_moments_then_rerun_gives_the_same_outputs() {
    let reference = Workspace::new();
    let p = reference.write("p.toml", PIPELINE);
    let clock = Instant::now();
    reference.run_statuses(&p, &[]);
    let full = clock.elapsed();
    let expected = outputs(&reference, &p);

    let mut rng = 17u64;
    for trial in 0..24 {
        let ws = Workspace::new();
        let p = ws.write("p.toml", PIPELINE);
        let mut kills = 0;
        // Up to three interruptions before the run is let finish.
        for _ in 0..3 {
            let delay = Duration::from_millis(lcg(&mut rng) % (full.as_millis() as u64 + 50));
            let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json", "-j", "2"]);
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            cmd.process_group(0);
            let mut child = cmd.spawn().unwrap();
            std::thread::sleep(delay);
            let pid = child.id() as i32;
            // SAFETY: plain kill(2) on our own child or its process group.
            unsafe {
                match trial % 4 {
                    0 => libc::kill(pid, libc::SIGKILL),
                    1 => libc::kill(-pid, libc::SIGKILL),
                    2 => libc::kill(pid, libc::SIGTERM),
                    _ => libc::kill(-pid, libc::SIGINT),
                };
            }
            let status = child.wait().unwrap();
            if !status.success() {
                kills += 1;
            }
        }
        let s = ws.run_statuses(&p, &[]);
        assert_eq!(s.len(), STAGES.len(), "trial {trial}: {s:?}");
        assert!(with_status(&s, "failed").is_empty(), "trial {trial}: {s:?}");
        assert_eq!(
            outputs(&ws, &p),
            expected,
            "trial {trial} ({kills} kills) differs"
        );
        common::assert_cache_verifies(&ws, &format!("trial {trial}"));
    }
}

#[test]
fn concurrent_runs_execute_each_key_once() {
    let ws = Workspace::new();
    let counter = ws.path().join("executions.log");
    let p = ws.write(
        "p.toml",
        &format!(
            r#"
[stage.a]
kind = "command"
run = "echo a >> {c}; sleep 0.6; echo A > $FLOW_OUT/a"

[stage.b]
kind = "command"
run = "echo b >> {c}; sleep 0.3; cat $FLOW_IN_A/a > $FLOW_OUT/b"
inputs = {{ a = "a" }}

[stage.c]
kind = "command"
run = "echo c >> {c}; echo C > $FLOW_OUT/c"
"#,
            c = counter.display()
        ),
    );
    let spawn = || {
        ws.command(&["run", p.to_str().unwrap(), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    std::thread::sleep(Duration::from_millis(150));
    let second = spawn();
    let (o1, o2) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert!(o1.status.success() && o2.status.success());
    let mut lines: Vec<String> = std::fs::read_to_string(&counter)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    assert_eq!(lines, ["a", "b", "c"], "each key ran exactly once");
    let s1 = statuses(&common::parse_lines(&o1.stdout));
    let s2 = statuses(&common::parse_lines(&o2.stdout));
    let mut ran = with_status(&s1, "ran");
    ran.extend(with_status(&s2, "ran"));
    ran.sort();
    assert_eq!(
        ran,
        ["a", "b", "c"],
        "one run ran each stage: {s1:?} {s2:?}"
    );
    let mut reused = with_status(&s1, "cached");
    reused.extend(with_status(&s2, "cached"));
    reused.sort();
    assert_eq!(
        reused,
        ["a", "b", "c"],
        "the other reused it: {s1:?} {s2:?}"
    );
    let waited = String::from_utf8_lossy(&o1.stderr) + String::from_utf8_lossy(&o2.stderr);
    assert!(
        waited.contains("waiting"),
        "the waiting run says so: {waited}"
    );
    assert_eq!(tree(&ws.output_dir(&p, "b"))[0].1, b"A\n");
}
