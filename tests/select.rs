//! Selection from a sweep (`kind = "select"`, `per`, `lr_from`) end to end: the choice is the
//! argmin computed here from every candidate's own summary, downstream training runs at the
//! chosen learning rate, and a changed candidate re-selects.

mod common;

use std::path::Path;

use common::{Workspace, assert_ok, with_status};

fn probe(lrs: &str, steps: u64) -> String {
    format!(
        r#"[stage.probe]
kind = "train-full"
model = "base"
data = "rows"
heldout = "held_rows"
lr = {lrs}
sweep = ["lr"]
steps = {steps}
global_batch = 8

[stage.pick]
kind = "select"
candidates = ["probe.curve"]
metric = "summary.json:heldout_loss"

[stage.after]
kind = "train-full"
model = "base"
data = "rows"
lr_from = "pick"
steps = 4
global_batch = 8
"#
    )
}

fn json_file(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

/// The chosen stage and every candidate's held-out loss, read from the candidates' own files.
fn expected(ws: &Workspace, p: &Path, lrs: &[&str]) -> (String, Vec<(String, f64)>) {
    let mut values = Vec::new();
    for lr in lrs {
        let stage = format!("probe[lr={lr}]");
        let dir = common::output_named(ws, p, &stage, "curve");
        let loss = json_file(&dir, "summary.json")["heldout_loss"]
            .as_f64()
            .unwrap();
        values.push((stage, loss));
    }
    let best = values
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
        .0
        .clone();
    (best, values)
}

#[test]
fn select_picks_the_lowest_heldout_loss_and_training_follows_it() {
    let ws = Workspace::new();
    let lrs = ["1e-4", "3e-3", "0.03"];
    let p = ws.write(
        "p.toml",
        &common::tiny_training_pipeline("select-test", &probe("[1e-4, 3e-3, 3e-2]", 12)),
    );
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let (best, values) = expected(&ws, &p, &lrs);
    let choice = json_file(
        &common::output_named(&ws, &p, "pick", "choice"),
        "choice.json",
    );
    assert_eq!(choice["chosen"]["stage"], best.as_str(), "{choice}");
    let listed: Vec<(String, f64)> = choice["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["stage"].as_str().unwrap().to_string(),
                c["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, values, "every candidate's value is recorded");
    // The downstream stage trained at the chosen candidate's lr.
    let chosen_lr = json_file(
        &common::output_named(&ws, &p, &best, "curve"),
        "summary.json",
    )["lr"]
        .as_f64()
        .unwrap();
    let after = json_file(
        &common::output_named(&ws, &p, "after", "curve"),
        "summary.json",
    );
    assert_eq!(after["lr"].as_f64().unwrap(), chosen_lr);
    // `flow show` names the chosen member and every candidate's value.
    let shown = ws.flow(&["show", p.to_str().unwrap(), "pick"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains(&best), "{text}");
    for (stage, _) in &values {
        assert!(text.contains(stage.as_str()), "{stage}: {text}");
    }

    // A changed candidate (longer probes) reruns the selection; nothing changed: all cached.
    std::fs::write(
        &p,
        common::tiny_training_pipeline("select-test", &probe("[1e-4, 3e-3, 3e-2]", 16)),
    )
    .unwrap();
    let statuses = ws.run_statuses(&p, &[]);
    assert!(
        with_status(&statuses, "ran").contains(&"pick".to_string()),
        "{statuses:?}"
    );
    let (best, _) = expected(&ws, &p, &lrs);
    let choice = json_file(
        &common::output_named(&ws, &p, "pick", "choice"),
        "choice.json",
    );
    assert_eq!(choice["chosen"]["stage"], best.as_str());
    let again = ws.run_statuses(&p, &[]);
    assert!(with_status(&again, "ran").is_empty(), "{again:?}");
}

#[test]
fn per_gives_one_selection_per_rank_and_lora_pairs_with_its_own() {
    let ws = Workspace::new();
    let train = r#"[stage.lora_lr]
kind = "train-lora"
model = "base"
data = "rows"
heldout = "held_rows"
rank = [2, 4]
lr = [1e-3, 1e-2]
sweep = ["rank", "lr"]
steps = 6
global_batch = 8

[stage.lora_pick]
kind = "select"
candidates = ["lora_lr.curve"]
metric = "summary.json:heldout_loss"
per = ["rank"]

[stage.lora]
kind = "train-lora"
model = "base"
data = "rows"
rank = [2, 4]
sweep = ["rank"]
lr_from = "lora_pick"
steps = 4
global_batch = 8
"#;
    let p = ws.write("p.toml", &common::tiny_training_pipeline("per-test", train));
    let plan = ws.json(&["plan", p.to_str().unwrap()], true);
    let names: Vec<&str> = plan.iter().filter_map(|e| e["stage"].as_str()).collect();
    assert!(
        names.contains(&"lora_pick[rank=2]") && names.contains(&"lora_pick[rank=4]"),
        "{names:?}"
    );
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    for r in [2, 4] {
        let choice = json_file(
            &common::output_named(&ws, &p, &format!("lora_pick[rank={r}]"), "choice"),
            "choice.json",
        );
        let stages: Vec<&str> = choice["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["stage"].as_str().unwrap())
            .collect();
        assert_eq!(
            stages,
            vec![
                format!("lora_lr[rank={r},lr=1e-3]"),
                format!("lora_lr[rank={r},lr=0.01]")
            ],
            "only rank {r}'s candidates"
        );
        let chosen_lr = choice["chosen"]["lr"].as_f64().unwrap();
        let after = json_file(
            &common::output_named(&ws, &p, &format!("lora[rank={r}]"), "curve"),
            "summary.json",
        );
        assert_eq!(after["lr"].as_f64().unwrap(), chosen_lr, "rank {r}");
    }
    // A coordinate no candidate has is a located error.
    let bad = ws.write(
        "bad.toml",
        &common::tiny_training_pipeline(
            "per-test",
            &train.replace("per = [\"rank\"]", "per = [\"depth\"]"),
        ),
    );
    let out = ws.flow(&["plan", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:") && err.contains("depth"), "{err}");
}

#[test]
fn a_missing_metric_and_an_ambiguous_lr_are_clear_errors() {
    let ws = Workspace::new();
    let text = common::tiny_training_pipeline("select-errors", &probe("[1e-4, 3e-3]", 4))
        .replace("summary.json:heldout_loss", "summary.json:no_such_key");
    let p = ws.write("p.toml", &text);
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no_such_key") && err.contains("probe[lr="),
        "{err}"
    );

    let both = common::tiny_training_pipeline("select-errors", &probe("[1e-4, 3e-3]", 4))
        .replace("lr_from = \"pick\"", "lr_from = \"pick\"\nlr = 1e-3")
        .replace("summary.json:heldout_loss", "summary.json:final_loss");
    let p = ws.write("both.toml", &both);
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lr_from") && err.contains("lr"), "{err}");
}

#[test]
fn within_and_prefer_take_the_highest_lr_close_to_the_best() {
    let ws = Workspace::new();
    let lrs = ["1e-4", "3e-3", "0.03"];
    let text = common::tiny_training_pipeline("select-prefer", &probe("[1e-4, 3e-3, 3e-2]", 8))
        .replace(
            "metric = \"summary.json:heldout_loss\"",
            "metric = \"summary.json:heldout_loss\"\nwithin = 0.5\nprefer = \"summary.json:lr\"",
        );
    let p = ws.write("p.toml", &text);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let (_, values) = expected(&ws, &p, &lrs);
    let best = values.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
    // The highest lr among those within 0.5 nats of the best (lrs ascend in the sweep).
    let want = values
        .iter()
        .rev()
        .find(|v| v.1 <= best + 0.5)
        .unwrap()
        .0
        .clone();
    let choice = json_file(
        &common::output_named(&ws, &p, "pick", "choice"),
        "choice.json",
    );
    assert_eq!(choice["chosen"]["stage"], want.as_str(), "{choice}");
}
