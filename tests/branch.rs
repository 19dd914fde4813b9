//! Cooldown branches (`branch = "cooldown"`) end to end: a trunk per duration, each branch
//! running only its cooldown, and every branch ending in the bits of training that duration
//! from scratch; a longer duration added later continues the cached trunk.

mod common;

use std::path::Path;

use common::{Workspace, assert_ok, with_status};

/// The trapezoid with a warmup in steps, dropout on: the protocol under test.
fn full(branch: bool, steps: &[u64]) -> String {
    format!(
        r#"[stage.full]
kind = "train-full"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 3e-3
optimizer = "adamw"
schedule = "trapezoid"
warmup = 3
steps = {steps:?}
sweep = ["steps"]
global_batch = 8
micro_batch = 4
checkpoint_every = 4
eval_every = 4
attention_dropout = 0.1
hidden_dropout = 0.1
{}
"#,
        if branch { "branch = \"cooldown\"" } else { "" }
    )
}

/// LoRA over two ranks: one chain of trunks per rank.
fn lora(branch: bool, steps: &[u64]) -> String {
    format!(
        r#"[stage.lora]
kind = "train-lora"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 1e-2
schedule = "trapezoid"
warmup = 2
cooldown = 0.25
rank = [2, 4]
steps = {steps:?}
sweep = ["rank", "steps"]
global_batch = 8
lora_dropout = 0.1
hidden_dropout = 0.1
{}
"#,
        if branch { "branch = \"cooldown\"" } else { "" }
    )
}

fn pipeline(train: &str) -> String {
    common::tiny_training_pipeline("branch-test", train)
}

/// Files of a directory: relative path and bytes.
type Files = Vec<(String, Vec<u8>)>;

/// Every file of every output of a stage, by output and relative path.
fn outputs(ws: &Workspace, p: &Path, stage: &str) -> Vec<(String, Files)> {
    let v = ws.json(&["show", p.to_str().unwrap(), stage], true);
    let mut out: Vec<(String, Files)> = v[0]["outputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, dir)| (name.clone(), common::tree(Path::new(dir.as_str().unwrap()))))
        .collect();
    out.sort();
    out
}

/// The log of a finished stage.
fn log(ws: &Workspace, p: &Path, stage: &str) -> String {
    let v = ws.json(&["show", p.to_str().unwrap(), stage], true);
    let key = v[0]["key"].as_str().unwrap();
    std::fs::read_to_string(ws.cache().join("logs").join(format!("{key}.log"))).unwrap()
}

/// The trapezoid's cooldown start, computed here as the schedule defines it.
fn cooldown_start(steps: u64, cooldown: f64) -> u64 {
    steps - (cooldown * steps as f64).round() as u64
}

#[test]
fn each_cooldown_branch_ends_in_the_bits_of_training_its_duration_from_scratch() {
    let steps = [10, 16, 24];
    let lora_steps = [8, 12];
    let (branched, scratch) = (Workspace::new(), Workspace::new());
    let pb = branched.write(
        "p.toml",
        &pipeline(&(full(true, &steps) + &lora(true, &lora_steps))),
    );
    let ps = scratch.write(
        "p.toml",
        &pipeline(&(full(false, &steps) + &lora(false, &lora_steps))),
    );

    // The plan names the trunks, where each trunk and branch starts and stops, and the
    // tokens saved, all computed here from the schedule's definition.
    let plan = branched.json(&["plan", pb.to_str().unwrap()], true);
    let budget = |stage: &str| -> String {
        plan.iter()
            .find(|e| e["stage"] == stage)
            .unwrap_or_else(|| panic!("no stage {stage} in the plan: {plan:?}"))["budget"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let per_step = 8 * 64;
    let mut trained = 0;
    let mut from = 0;
    for s in steps {
        let start = cooldown_start(s, 0.2);
        assert_eq!(
            budget(&format!("full-trunk[steps={s}]")),
            format!(
                "trunk: steps {from}..{start} of {s} = {} tokens",
                (start - from) * per_step
            )
        );
        assert_eq!(
            budget(&format!("full[steps={s}]")),
            format!(
                "cooldown branch: steps {start}..{s} of {s} = {} tokens",
                (s - start) * per_step
            )
        );
        trained += s - from;
        from = start;
    }
    for _rank in [2, 4] {
        let mut from = 0;
        for s in lora_steps {
            let start = cooldown_start(s, 0.25);
            trained += s - from;
            from = start;
        }
    }
    let summary = plan.last().unwrap();
    assert_eq!(summary["train_tokens"], trained * per_step, "{summary}");
    let scratch_steps: u64 = steps.iter().sum::<u64>() + 2 * lora_steps.iter().sum::<u64>();
    assert_eq!(
        summary["train_tokens_from_scratch"],
        scratch_steps * per_step
    );
    let text = branched.flow(&["plan", pb.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!(
            "training: {} tokens with cooldown branches, {} with every duration from scratch",
            trained * per_step,
            scratch_steps * per_step
        )),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    assert_ok(&branched.flow(&["run", pb.to_str().unwrap()]));
    assert_ok(&scratch.flow(&["run", ps.to_str().unwrap()]));
    let mut members: Vec<String> = steps.iter().map(|s| format!("full[steps={s}]")).collect();
    for r in [2, 4] {
        members.extend(
            lora_steps
                .iter()
                .map(|s| format!("lora[rank={r},steps={s}]")),
        );
    }
    for m in &members {
        let (b, s) = (outputs(&branched, &pb, m), outputs(&scratch, &ps, m));
        assert_eq!(
            b.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
        );
        for ((name, bf), (_, sf)) in b.iter().zip(&s) {
            assert!(!bf.is_empty(), "{m}: output {name} is empty");
            for ((path, bytes), (spath, sbytes)) in bf.iter().zip(sf) {
                assert_eq!(path, spath);
                assert!(
                    bytes == sbytes,
                    "{m}: {name}/{path} differs between the cooldown branch and the run from scratch"
                );
            }
            assert_eq!(bf.len(), sf.len(), "{m}: {name}");
        }
    }
    // Each branch ran only its cooldown, from its own trunk; the from-scratch run did not.
    let l = log(&branched, &pb, "full[steps=16]");
    assert!(
        l.contains(&format!(
            "starting at step {} from the checkpoint of trunk full-trunk[steps=16]",
            cooldown_start(16, 0.2)
        )),
        "{l}"
    );
    assert!(
        l.contains(&format!("done: {} steps", 16 - cooldown_start(16, 0.2))),
        "{l}"
    );
    let l = log(&branched, &pb, "lora[rank=4,steps=12]");
    assert!(
        l.contains("from the checkpoint of trunk lora-trunk[rank=4,steps=12]"),
        "{l}"
    );
    let trunk = log(&branched, &pb, "lora-trunk[rank=4,steps=12]");
    assert!(
        trunk.contains(&format!(
            "starting at step {} from the checkpoint of trunk lora-trunk[rank=4,steps=8]",
            cooldown_start(8, 0.25)
        )),
        "each rank has its own chain: {trunk}"
    );
    assert!(!log(&scratch, &ps, "full[steps=16]").contains("trunk"));

    // A stage that continues a trunk it does not share its steps with is refused, naming
    // what differs.
    let wrong = pb.with_file_name("wrong.toml");
    std::fs::write(
        &wrong,
        pipeline(
            &(full(true, &steps)
                + r#"
[stage.other]
kind = "train-full"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 1e-3
optimizer = "adamw"
schedule = "trapezoid"
warmup = 3
steps = 16
global_batch = 8
micro_batch = 4
eval_every = 4
attention_dropout = 0.1
hidden_dropout = 0.1
resume = "full-trunk[steps=16].checkpoint"
"#),
        ),
    )
    .unwrap();
    let out = branched.flow(&["run", wrong.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("params.lr: 0.003 in the trunk, 0.001 here"),
        "{err}"
    );
}

#[test]
fn a_longer_duration_added_later_continues_the_cached_trunk() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline(&full(true, &[10, 16])));
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let before = outputs(&ws, &p, "full[steps=16]");
    std::fs::write(&p, pipeline(&full(true, &[10, 16, 24]))).unwrap();
    let statuses = ws.run_statuses(&p, &[]);
    let ran = with_status(&statuses, "ran");
    assert_eq!(
        ran,
        vec![
            "full-trunk[steps=24]".to_string(),
            "full[steps=24]".to_string()
        ],
        "only the new trunk and its branch train: {statuses:?}"
    );
    for cached in [
        "full-trunk[steps=10]",
        "full-trunk[steps=16]",
        "full[steps=16]",
    ] {
        assert!(
            with_status(&statuses, "cached").contains(&cached.to_string()),
            "{cached}: {statuses:?}"
        );
    }
    assert_eq!(outputs(&ws, &p, "full[steps=16]"), before);
    let l = log(&ws, &p, "full-trunk[steps=24]");
    let (from, to) = (cooldown_start(16, 0.2), cooldown_start(24, 0.2));
    assert!(
        l.contains(&format!(
            "starting at step {from} from the checkpoint of trunk full-trunk[steps=16]"
        )) && l.contains(&format!("trunk done at step {to}: {} steps", to - from)),
        "the new trunk continues the cached one: {l}"
    );
}

#[test]
fn branching_needs_a_duration_sweep_and_the_trapezoid_with_whole_step_warmup() {
    let ws = Workspace::new();
    let cases: [(&str, &str, &str); 5] = [
        (
            "schedule = \"trapezoid\"",
            "schedule = \"cosine\"",
            "need schedule = \"trapezoid\"",
        ),
        (
            "warmup = 3",
            "warmup = 0.1",
            "need `warmup` as a step count",
        ),
        (
            "steps = [10, 16]",
            "epochs = 2.0\nsteps = [10, 16]",
            "needs one duration (steps, tokens, epochs), swept or not",
        ),
        (
            "branch = \"cooldown\"",
            "branch = \"warm\"",
            "unknown protocol `warm`",
        ),
        (
            "branch = \"cooldown\"",
            "branch = \"cooldown\"\n[stage.full-trunk]\nkind = \"model\"\ntokenizer = \"tokenizer.tokenizer\"",
            "[stage.full-trunk] exists",
        ),
    ];
    for (from, to, message) in cases {
        let text = pipeline(&full(true, &[10, 16])).replacen(from, to, 1);
        let line = text
            .lines()
            .position(|l| l.starts_with(to.lines().next().unwrap()))
            .unwrap()
            + 1;
        let p = ws.write("p.toml", &text);
        let out = ws.flow(&["plan", p.to_str().unwrap()]);
        assert!(!out.status.success(), "{to}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{to}: {err}");
        let at_the_line = format!("p.toml:{line}:");
        let at_branch = format!(
            "p.toml:{}:",
            text.lines().position(|l| l.starts_with("branch")).unwrap() + 1
        );
        assert!(
            err.contains(&at_the_line) || err.contains(&at_branch),
            "{to}: located at {at_the_line} or {at_branch}: {err}"
        );
    }
    // Only training kinds branch.
    let text = pipeline(
        "[stage.m]\nkind = \"model\"\ntokenizer = \"tokenizer.tokenizer\"\nbranch = \"cooldown\"\n",
    );
    let p = ws.write("p.toml", &text);
    let out = ws.flow(&["plan", p.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kind `model` has no cooldown branches"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_killed_branch_resumes_from_its_own_checkpoint_with_the_same_bits() {
    // One duration of 120 steps with a half-length cooldown: the trunk stops at 60, so a
    // checkpoint at step 64 or later is the branch's own.
    let text = pipeline(&full(true, &[120]).replace(
        "branch = \"cooldown\"",
        "branch = \"cooldown\"\ncooldown = 0.5",
    ));
    let whole = Workspace::new();
    let pw = whole.write("p.toml", &text);
    assert_ok(&whole.flow(&["run", pw.to_str().unwrap()]));

    let ws = Workspace::new();
    let p = ws.write("p.toml", &text);
    let (_, killed_at) = common::kill_at_a_checkpoint(&ws, &p, 64);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let l = log(&ws, &p, "full[steps=120]");
    let step: u64 = killed_at.trim_start_matches("ckpt-").parse().unwrap();
    assert!(
        l.contains("starting at step 60 from the checkpoint of trunk full-trunk[steps=120]")
            && l.contains(&format!("resumed from checkpoint at step {step}")),
        "the first attempt started from the trunk, the second from its own checkpoint: {l}"
    );
    assert_eq!(
        outputs(&ws, &p, "full[steps=120]"),
        outputs(&whole, &pw, "full[steps=120]"),
        "the resumed branch ends in the uninterrupted one's bits"
    );
}
