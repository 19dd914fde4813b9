//! The `report` stage on a miniature study: base, full finetuning at two durations, LoRA at
//! two ranks, their evals and spectra, drawn into HTML, Markdown, SVG, PNG and CSV.

mod common;

use common::{Workspace, assert_ok, output_named};

const STUDY: &str = r#"[pipeline]
name = "report-test"
seed = 4

[stage.world]
kind = "synthetic"
domain = ["general", "math"]
sweep = ["domain"]
docs = 500
pairs = 40
eval = 12
heldout = 12

[stage.tokenizer]
kind = "tokenize"
vocab_size = 400
train_data = ["world.cpt"]

[stage.general_tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world[domain=general].cpt"]

[stage.math_tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world[domain=math].cpt"]

[stage.general_rows]
kind = "pack"
tokens = "general_tokens.tokens"
seq_len = 64

[stage.math_rows]
kind = "pack"
tokens = "math_tokens.tokens"
seq_len = 64

[stage.base]
kind = "model"
tokenizer = "tokenizer.tokenizer"
hidden_size = 64
layers = 2
heads = 4
kv_heads = 2
max_positions = 512

[stage.pretrain]
kind = "train-full"
model = "base"
data = "general_rows"
optimizer = "adamw"
lr = 3e-3
steps = 15
global_batch = 8

[stage.full]
kind = "train-full"
model = "pretrain"
data = "math_rows"
lr = 1e-3
steps = [4, 8]
sweep = ["steps"]
global_batch = 8

[stage.lora]
kind = "train-lora"
model = "pretrain"
data = "math_rows"
lr = 1e-2
rank = [2, 4]
sweep = ["rank"]
steps = 8
global_batch = 8

[stage.eval_base]
kind = "eval"
model = "pretrain"
tasks = ["gsm8k", "forgetting"]
gsm8k = "world[domain=math].eval"
gsm8k_shots = 1
choice = ["world[domain=general].eval"]
max_new_tokens = 12
limit = 6

[stage.eval_full]
kind = "eval"
model = "full"
tasks = ["gsm8k", "forgetting"]
gsm8k = "world[domain=math].eval"
gsm8k_shots = 1
choice = ["world[domain=general].eval"]
max_new_tokens = 12
limit = 6

[stage.eval_lora]
kind = "eval"
model = "lora"
tasks = ["gsm8k", "forgetting"]
gsm8k = "world[domain=math].eval"
gsm8k_shots = 1
choice = ["world[domain=general].eval"]
max_new_tokens = 12
limit = 6

[stage.svd_full]
kind = "svd"
base = "pretrain"
finetuned = "full"
control_log10_c = [-2, -1, 0]

[stage.report]
kind = "report"
evals = ["eval_base", "eval_full", "eval_lora"]
curves = ["full.curve", "lora.curve"]
svd = ["svd_full"]
title = "Mini study"
"#;

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is a PNG", path.display());
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn the_report_draws_every_figure_and_lists_every_number() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", STUDY);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let dir = output_named(&ws, &p, "report", "report");

    let figures = [
        "learning_vs_forgetting",
        "by_duration",
        "rank_by_layer",
        "spectra",
        "loss_curves",
    ];
    for f in figures {
        let (w, h) = png_size(&dir.join(format!("figures/{f}.png")));
        assert!(w >= 560 && h >= 420, "{f}: {w}x{h}");
        let svg = std::fs::read_to_string(dir.join(format!("figures/{f}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<text"),
            "{f}.svg has labels"
        );
    }
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        figures.len(),
        "figures inline"
    );
    assert!(!html.contains("src=\"http"), "self-contained");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for f in figures {
        assert!(md.contains(&format!("(figures/{f}.png)")));
    }

    // The summary: one line per evaluated model, methods without their duration.
    let summary = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    let lines: Vec<&str> = summary.lines().collect();
    assert_eq!(lines.len(), 1 + 5, "{summary}");
    for m in [
        "base (pretrain)",
        "full[steps=4]",
        "full[steps=8]",
        "lora[rank=2]",
        "lora[rank=4]",
    ] {
        assert!(summary.contains(m), "{m} in {summary}");
    }
    assert!(lines[0].contains("gsm8k.strict_match") && lines[0].contains("forgetting.score"));

    // results.csv: every metric of every eval, with its stage; and the numbers agree with
    // the eval stages' own metrics files.
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let eval_dir = output_named(&ws, &p, "eval_full[steps=8]", "results");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_dir.join("metrics.json")).unwrap())
            .unwrap();
    let score = m["tasks"]["forgetting"]["score"].as_f64().unwrap();
    assert!(
        csv.lines().any(
            |l| l.starts_with("eval_full[steps=8],full[steps=8],forgetting.score,")
                && (l.rsplit(',').next().unwrap().parse::<f64>().unwrap() - score).abs() < 1e-12
        ),
        "{csv}"
    );
    for stage in ["svd_full[steps=4]", "svd_full[steps=8]"] {
        assert!(
            csv.contains(&format!("{stage},full[steps=")),
            "{stage} in results.csv"
        );
    }
    assert!(csv.contains("lora[rank=4],lora[rank=4],train.tokens,4096"));

    // `flow show` tells where the report is.
    let out = ws.flow(&["show", p.to_str().unwrap(), "report"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(dir.to_str().unwrap()));
}

// ---------------------------------------------------------------------------------------
// Replicates and confidence intervals (issue 23, item 3): the report stage run directly on
// fixture artifacts (evals with samples.jsonl, curves, svd summaries), seeds as replicates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flow_stages::kind::{InputArtifact, InputSlot, Progress, StageContext};
use flow_stages::report::stats::{self, Items, Replicate};
use serde_json::{Value, json};

struct Quiet;

impl Progress for Quiet {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: &str) {}
}

/// Item `i` of a run is right when a hash of (i, salt) falls below p: deterministic items
/// with accuracy close to p, different per salt (seed).
fn bernoulli(n: usize, p: f64, salt: &str) -> Vec<bool> {
    (0..n)
        .map(|i| {
            let h = blake3::hash(format!("{salt}/{i}").as_bytes());
            let x =
                u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap()) as f64 / u64::MAX as f64;
            x < p
        })
        .collect()
}

fn mean(v: &[bool]) -> f64 {
    v.iter().filter(|&&b| b).count() as f64 / v.len() as f64
}

/// An eval's `results` directory: GSM8K strict match and the forgetting score (three styles),
/// with their samples.jsonl unless `samples` is false.
fn eval_dir(
    root: &Path,
    stage: &str,
    model: &str,
    gsm: &[bool],
    styles: &[Vec<bool>; 3],
    samples: bool,
) -> InputArtifact {
    let dir = root.join("evals").join(stage);
    std::fs::create_dir_all(&dir).unwrap();
    let names = ["hellaswag", "arc", "winogrande"];
    let mut lines = String::new();
    for (i, &c) in gsm.iter().enumerate() {
        lines += &format!(
            "{}\n",
            json!({"task": "gsm8k", "index": i, "correct_strict": c, "correct_flexible": c})
        );
    }
    let mut index = 0;
    let mut tasks = serde_json::Map::new();
    let mut parts = serde_json::Map::new();
    for (name, items) in names.iter().zip(styles) {
        for &c in items {
            // gold 1; the prediction is 1 when right, else 0.
            lines += &format!(
                "{}\n",
                json!({"task": name, "index": index, "gold": 1, "pred_acc": c as u8,
                       "pred_acc_norm": 0, "pred_acc_ppl": 0})
            );
            index += 1;
        }
        parts.insert(name.to_string(), json!(mean(items)));
        tasks.insert(
            name.to_string(),
            json!({"acc": mean(items), "n": items.len()}),
        );
    }
    let score = parts.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 3.0;
    tasks.insert(
        "gsm8k".into(),
        json!({"strict_match": mean(gsm), "n": gsm.len()}),
    );
    tasks.insert(
        "forgetting".into(),
        json!({"score": score, "metric": "acc", "parts": parts}),
    );
    let metrics = json!({"tasks": tasks, "model": {"stage": model, "digest": "d"}});
    std::fs::write(dir.join("metrics.json"), metrics.to_string()).unwrap();
    if samples {
        std::fs::write(dir.join("samples.jsonl"), lines).unwrap();
    }
    artifact(stage, dir)
}

fn artifact(stage: &str, dir: PathBuf) -> InputArtifact {
    InputArtifact {
        stage: stage.to_string(),
        dir,
        digest: "d".into(),
    }
}

/// A training stage's `curve` output: one row at `tokens`, and its summary.json.
fn curve_dir(root: &Path, stage: &str, tokens: f64, rank: Option<u32>) -> InputArtifact {
    let dir = root.join("curves").join(stage);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("curve.csv"),
        format!("step,tokens,lr,loss,grad_norm,heldout_loss\n1,{},0.001,2.5,1.0,\n2,{tokens},0.001,2.0,1.0,2.1\n", tokens / 2.0),
    )
    .unwrap();
    let summary =
        json!({"method": if rank.is_some() {"lora"} else {"full"}, "rank": rank, "tokens": tokens});
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    artifact(stage, dir)
}

/// An svd stage's `spectra`: rank@90% by layer for q and v, and the spectra file.
fn svd_dir(root: &Path, stage: &str, finetuned: &str, q: &[f64], v: &[f64]) -> InputArtifact {
    let dir = root.join("svd").join(stage);
    std::fs::create_dir_all(&dir).unwrap();
    let m = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let summary = json!({
        "variance": 0.9, "spectrum": "squared", "matrices": q.len() + v.len(),
        "mean_rank_delta": {"q": m(q), "v": m(v)},
        "rank_delta_by_layer": {"q": q, "v": v},
        "finetuned": {"stage": finetuned, "digest": "d", "kind": "model"},
    });
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    let sv: Vec<u8> = [3.0f32, 2.0, 1.0, 0.5]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let name = "model.layers.0.self_attn.q_proj.weight.delta";
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &sv).unwrap();
    safetensors::serialize_to_file([(name, view)], None, &dir.join("spectra.safetensors")).unwrap();
    artifact(stage, dir)
}

/// Runs the report kind on the artifacts; returns its output directory.
fn report(
    root: &Path,
    out: &str,
    evals: Vec<InputArtifact>,
    curves: Vec<InputArtifact>,
    svd: Vec<InputArtifact>,
) -> PathBuf {
    let params = json!({
        "learning": "auto", "forgetting": "forgetting.score",
        "duration_keys": ["steps", "tokens", "epochs"], "replicate_keys": ["seed"],
        "regularizers": ["weight_decay", "dropout", "_wd"],
        "matrix": "model.layers.0.self_attn.q_proj.weight", "title": "replicates",
    });
    let mut inputs = BTreeMap::new();
    for (name, a) in [("evals", evals), ("curves", curves), ("svd", svd)] {
        inputs.insert(
            name.to_string(),
            InputSlot {
                list: true,
                artifacts: a,
            },
        );
    }
    let dir = root.join(out);
    std::fs::create_dir_all(dir.join("report")).unwrap();
    let outputs = BTreeMap::from([("report".to_string(), dir.join("report"))]);
    let ctx = StageContext {
        stage: "report",
        params: &params,
        inputs: &inputs,
        outputs: &outputs,
        scratch: &dir,
        log: &dir.join("log"),
        threads: 1,
        device: "cpu",
        live_logs: None,
        progress: &Quiet,
    };
    (flow_stages::report::KIND.run)(&ctx).unwrap_or_else(|e| panic!("report failed: {e}"));
    dir.join("report")
}

/// A study of three seeds per method: `full` at two durations, LoRA r=4 and r=16, a
/// weight-decay run, the base; accuracies chosen by `p(method)` = (learning, forgetting
/// styles).
fn study(
    root: &Path,
    p: &dyn Fn(&str) -> (f64, f64),
    with_svd: bool,
    missing: Option<&str>,
) -> (Vec<InputArtifact>, Vec<InputArtifact>, Vec<InputArtifact>) {
    let mut evals = Vec::new();
    let mut curves = Vec::new();
    let mut svd = Vec::new();
    let (bl, bf) = p("base");
    evals.push(eval_dir(
        root,
        "eval_base",
        "pretrain",
        &bernoulli(150, bl, "base/gsm"),
        &[0, 1, 2].map(|s| bernoulli(50, bf, &format!("base/{s}"))),
        true,
    ));
    let runs: [(&str, &str, f64, Option<u32>); 5] = [
        ("full", "tokens=1000", 1000.0, None),
        ("full", "tokens=2000", 2000.0, None),
        ("lora", "rank=4,tokens=2000", 2000.0, Some(4)),
        ("lora", "rank=16,tokens=2000", 2000.0, Some(16)),
        ("full_wd", "tokens=2000,weight_decay=0.1", 2000.0, None),
    ];
    for (name, coords, tokens, rank) in runs {
        for seed in [1, 2, 3] {
            // The engine's names: coordinates sorted by key.
            let mut c: Vec<String> = coords.split(',').map(String::from).collect();
            c.push(format!("seed={seed}"));
            c.sort();
            let model = format!("{name}[{}]", c.join(","));
            let (l, f) = p(name);
            // The items are what is shared: salts depend on the seed, not on the method, so
            // two methods of equal accuracy give identical items.
            let eval = format!("eval_{model}");
            evals.push(eval_dir(
                root,
                &eval,
                &model,
                &bernoulli(150, l, &format!("{seed}/{tokens}/gsm")),
                &[0, 1, 2].map(|s| bernoulli(50, f, &format!("{seed}/{tokens}/{s}"))),
                missing != Some(eval.as_str()),
            ));
            curves.push(curve_dir(root, &model, tokens, rank));
            if with_svd && name == "full" {
                let ranks: Vec<f64> = (0..4).map(|l| 40.0 + l as f64 + seed as f64).collect();
                svd.push(svd_dir(
                    root,
                    &format!("svd_{model}"),
                    &model,
                    &ranks,
                    &ranks[1..],
                ));
            }
        }
    }
    (evals, curves, svd)
}

/// One CSV line's fields (quotes as the report writes them).
fn split_csv(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn findings(dir: &Path) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("findings.json")).unwrap()).unwrap();
    v["findings"].as_array().unwrap().clone()
}

/// Polylines drawn as whiskers (bars and caps): (x1, y1, x2, y2).
fn whiskers(svg: &str) -> Vec<(i64, i64, i64, i64)> {
    let opacity = format!(
        "opacity=\"{}\"",
        flow_stages::report::figures::WHISKER_OPACITY
    );
    svg.split("<polyline")
        .skip(1)
        .map(|t| &t[..t.find("/>").unwrap()])
        .filter(|t| t.contains(&opacity))
        .map(|t| {
            let s = &t[t.find("points=\"").unwrap() + 8..];
            let v: Vec<i64> = s[..s.find('"').unwrap()]
                .split([' ', ','])
                .filter(|x| !x.is_empty())
                .map(|x| x.parse().unwrap())
                .collect();
            assert_eq!(v.len(), 4, "a whisker is one segment: {t}");
            (v[0], v[1], v[2], v[3])
        })
        .collect()
}

fn circles(svg: &str) -> Vec<(i64, i64)> {
    svg.split("<circle")
        .skip(1)
        .map(|t| {
            let get = |k: &str| -> i64 {
                let k = format!("{k}=\"");
                let s = &t[t.find(&k).unwrap() + k.len()..];
                s[..s.find('"').unwrap()].parse().unwrap()
            };
            (get("cx"), get("cy"))
        })
        .collect()
}

#[test]
fn replicates_are_one_point_with_error_bars_and_the_findings_follow_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Full finetuning learns far more and forgets far more than LoRA; weight decay changes
    // nothing; full finetuning's changes have rank ~42 against LoRA's 16.
    let clear = |m: &str| match m {
        "base" => (0.02, 0.95),
        "lora" => (0.15, 0.85),
        "full_wd" => (0.5, 0.5),
        _ => (0.6, 0.4),
    };
    let (evals, curves, svd) = study(root, &clear, true, None);
    let dir = report(root, "a", evals.clone(), curves.clone(), svd.clone());

    // One point per (method, duration), three seeds each.
    let summary = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    assert_eq!(summary.lines().count(), 1 + 6, "{summary}");
    assert!(
        summary.contains("full[tokens=1000]") && !summary.contains("seed="),
        "{summary}"
    );
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(split_csv).collect();
    assert_eq!(rows.len(), 12, "{csv}");
    for r in &rows {
        let (m, lo, hi): (f64, f64, f64) = (
            r[5].parse().unwrap(),
            r[6].parse().unwrap(),
            r[7].parse().unwrap(),
        );
        assert!(lo < m && m < hi, "{r:?}");
        if r[0].starts_with("base") {
            assert_eq!((r[3].as_str(), r[8].as_str()), ("1", "items"), "{r:?}");
        } else {
            assert_eq!(
                (r[3].as_str(), r[8].as_str()),
                ("3", "items and seeds"),
                "{r:?}"
            );
        }
    }

    // Error bars: every point of learning vs forgetting has a vertical and a horizontal
    // whisker (3 lines each: the bar and two caps) centred on its marker.
    let svg = std::fs::read_to_string(dir.join("figures/learning_vs_forgetting.svg")).unwrap();
    let w = whiskers(&svg);
    assert_eq!(
        w.len(),
        6 * 6,
        "6 points x (vertical + horizontal) x 3 lines"
    );
    let markers = circles(&svg);
    assert_eq!(markers.len(), 5, "5 trained points");
    let cap = flow_stages::report::figures::WHISKER_CAP as i64;
    for &(cx, cy) in &markers {
        let vertical = w
            .iter()
            .filter(|l| l.0 == cx && l.2 == cx && l.1.min(l.3) < cy && l.1.max(l.3) > cy)
            .count();
        let horizontal = w
            .iter()
            .filter(|l| l.1 == cy && l.3 == cy && l.0.min(l.2) < cx && l.0.max(l.2) > cx)
            .count();
        // (Points of equal accuracy may share a pixel column or row.)
        assert!(
            vertical >= 1 && horizontal >= 1,
            "marker ({cx}, {cy}) has its two whiskers: {w:?}"
        );
    }
    // Caps are WHISKER_CAP wide.
    assert!(
        w.iter()
            .filter(|l| (l.1 == l.3) && (l.2 - l.0).abs() == cap)
            .count()
            >= 5
    );
    // Bar lengths are the intervals: pixels per unit agree between two points of the panel.
    let learning_rows: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| r[4] == "gsm8k.strict_match" && !r[0].starts_with("base"))
        .collect();
    let mut px_per_unit = Vec::new();
    for (i, &(cx, cy)) in markers.iter().enumerate() {
        let bar = w
            .iter()
            .find(|l| l.0 == cx && l.2 == cx && l.1.min(l.3) < cy && l.1.max(l.3) > cy)
            .unwrap();
        let _ = i;
        px_per_unit.push((bar.3 - bar.1).abs() as f64);
    }
    let widths: Vec<f64> = learning_rows
        .iter()
        .map(|r| r[7].parse::<f64>().unwrap() - r[6].parse::<f64>().unwrap())
        .collect();
    let (pmin, pmax) = (
        px_per_unit.iter().cloned().fold(f64::MAX, f64::min),
        px_per_unit.iter().cloned().fold(0.0, f64::max),
    );
    let (wmin, wmax) = (
        widths.iter().cloned().fold(f64::MAX, f64::min),
        widths.iter().cloned().fold(0.0, f64::max),
    );
    assert!(
        ((pmax / pmin) - (wmax / wmin)).abs() < 0.25 * (wmax / wmin),
        "bar lengths {px_per_unit:?} follow interval widths {widths:?}"
    );
    let svg = std::fs::read_to_string(dir.join("figures/by_duration.svg")).unwrap();
    assert_eq!(
        whiskers(&svg).len(),
        2 * 6 * 3,
        "two panels, vertical whiskers on 6 points"
    );

    // The findings: all four supported by constructed data.
    let f = findings(&dir);
    assert_eq!(f.len(), 4);
    for (i, x) in f.iter().enumerate() {
        assert_eq!(x["id"], i + 1);
        assert_eq!(x["verdict"], "supports", "finding {}: {x:#}", i + 1);
        let c = &x["comparisons"][0];
        let (d, lo, hi) = (
            c["difference"].as_f64().unwrap(),
            c["ci"][0].as_f64().unwrap(),
            c["ci"][1].as_f64().unwrap(),
        );
        assert!(lo > 0.0 && lo <= d && d <= hi, "{c}");
    }
    // 1: largest rank first, at the longest common duration; full learns ~0.45 more.
    let c = &f[0]["comparisons"][0];
    assert_eq!(
        (c["a"].as_str(), c["b"].as_str(), c["tokens"].as_f64()),
        (Some("full"), Some("lora[rank=16]"), Some(2000.0))
    );
    assert!(
        (c["difference"].as_f64().unwrap() - 0.45).abs() < 0.1,
        "{c}"
    );
    assert_eq!(
        f[0]["comparisons"].as_array().unwrap().len(),
        2,
        "a row per rank"
    );
    assert_eq!(f[2]["comparisons"][0]["b"], "full_wd[weight_decay=0.1]");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    for s in [&md, &html] {
        assert!(s.contains("Findings") && s.matches("supports").count() >= 4);
        assert!(s.contains(" [0."), "intervals in the tables");
    }

    // Determinism: the same inputs give the same bytes.
    let again = report(root, "b", evals, curves, svd);
    assert_eq!(common::tree(&dir), common::tree(&again));
}

#[test]
fn equal_methods_cannot_tell_and_absent_inputs_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Every trained method has the same accuracies (and, seed by seed, the same items).
    let same = |m: &str| if m == "base" { (0.0, 0.9) } else { (0.3, 0.6) };
    let (evals, curves, _) = study(
        root,
        &same,
        false,
        Some("eval_lora[rank=4,seed=2,tokens=2000]"),
    );
    let evals: Vec<_> = evals
        .into_iter()
        .filter(|e| !e.stage.contains("full_wd"))
        .collect();
    let dir = report(root, "a", evals, curves, Vec::new());
    let f = findings(&dir);
    assert_eq!(f.len(), 4);
    for x in &f {
        assert_eq!(x["verdict"], "cannot tell", "{x:#}");
    }
    for i in [0, 1] {
        let c = &f[i]["comparisons"][0];
        assert_eq!(c["difference"].as_f64(), Some(0.0), "{c}");
        // Seeds are resampled independently per method: the interval straddles 0.
        let (lo, hi) = (c["ci"][0].as_f64().unwrap(), c["ci"][1].as_f64().unwrap());
        assert!(lo < 0.0 && hi > 0.0, "{c}");
    }
    assert!(
        f[2]["basis"]
            .as_str()
            .unwrap()
            .contains("no weight-decay or dropout runs"),
        "{}",
        f[2]
    );
    assert!(
        f[3]["basis"].as_str().unwrap().contains("no svd"),
        "{}",
        f[3]
    );
    // The base: 0 of 150 right, yet not a zero-width interval (Wilson floor).
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let base = csv
        .lines()
        .find(|l| l.starts_with("base") && l.contains("gsm8k"))
        .unwrap();
    let hi: f64 = split_csv(base)[7].parse().unwrap();
    assert!((hi - 3.8415 / (150.0 + 3.8415)).abs() < 1e-4, "{base}");
    // The missing samples.jsonl: its point falls back to the spread over seeds, and says so.
    let lora4 = csv
        .lines()
        .find(|l| l.starts_with("lora[rank=4]") && l.contains("gsm8k"))
        .unwrap();
    assert!(lora4.contains(",seeds only,"), "{lora4}");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("eval_lora[rank=4,seed=2,tokens=2000]: no samples.jsonl"),
        "{md}"
    );
}

/// scipy.stats.bootstrap (percentile) on the same items: the report's intervals agree within
/// Monte-Carlo error, stratified (the forgetting score) and not; degenerate inputs agree
/// exactly (a constant score; Wilson's formula at 0 of n).
#[test]
fn item_intervals_agree_with_scipy() {
    let scores: Vec<f64> = (0..60)
        .map(|i| ((i * 37 % 11) as f64 / 10.0).min(1.0))
        .collect();
    let strata: Vec<Vec<f64>> = [0.9, 0.5, 0.2]
        .iter()
        .enumerate()
        .map(|(s, &p)| {
            bernoulli(50, p, &format!("scipy/{s}"))
                .iter()
                .map(|&b| b as u8 as f64)
                .collect()
        })
        .collect();
    let b = 20000;
    let flat = stats::item_interval(&Items::flat("x", scores.clone()), b, stats::SEED);
    let strat = stats::item_interval(
        &Items {
            strata: strata
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("s{i}"), v.clone()))
                .collect(),
        },
        b,
        stats::SEED,
    );
    let program = r#"
import json, sys, numpy as np
from scipy import stats
flat, strata = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rng = np.random.default_rng(7)
a = stats.bootstrap((np.array(flat),), np.mean, method="percentile", n_resamples=50000, random_state=rng).confidence_interval
def stat(*xs, axis=-1):
    return sum(np.mean(x, axis=axis) for x in xs) / len(xs)
b = stats.bootstrap(tuple(np.array(s) for s in strata), stat, method="percentile", paired=False, n_resamples=50000, random_state=rng).confidence_interval
c = stats.bootstrap((np.full(20, 0.5),), np.mean, method="percentile", n_resamples=1000, random_state=rng).confidence_interval
z = 1.959963984540054; n = 150
print(json.dumps([a.low, a.high, b.low, b.high, c.low, c.high, z * z / (n + z * z)]))
"#;
    let out = common::python(
        program,
        &[&json!(scores).to_string(), &json!(strata).to_string()],
    );
    let r: Vec<f64> = serde_json::from_str(out.trim()).unwrap();
    let tol = 0.006;
    assert!(
        (flat.1 - r[0]).abs() < tol && (flat.2 - r[1]).abs() < tol,
        "flat {flat:?} scipy {r:?}"
    );
    assert!(
        (strat.1 - r[2]).abs() < tol && (strat.2 - r[3]).abs() < tol,
        "stratified {strat:?} scipy {r:?}"
    );
    // Not stratifying would be wider: the check can fail.
    let pooled: Vec<f64> = strata.concat();
    let p = stats::item_interval(&Items::flat("x", pooled), b, stats::SEED);
    assert!(
        (p.2 - p.1) - (strat.2 - strat.1) > 2.0 * tol,
        "pooled {p:?} vs stratified {strat:?}"
    );
    // Degenerate: a constant score, exactly scipy's; 0 of 150 right, exactly Wilson.
    let c = stats::item_interval(&Items::flat("x", vec![0.5; 20]), 1000, stats::SEED);
    assert_eq!((c.1, c.2), (r[4], r[5]));
    let z = stats::item_interval(&Items::flat("x", vec![0.0; 150]), 1000, stats::SEED);
    assert_eq!(z.1, 0.0);
    assert!((z.2 - r[6]).abs() < 1e-12, "{z:?} {}", r[6]);
}

/// The two-level bootstrap against a numpy implementation of the same scheme (items drawn
/// once per resample for all seeds, seeds drawn with replacement, the seed level rescaled by
/// sqrt(S/(S-1))), and against the analytic variance when items carry no noise.
#[test]
fn the_hierarchical_bootstrap_matches_numpy_and_the_analytic_seed_variance() {
    let seeds: Vec<Vec<f64>> = [0.3, 0.4, 0.55]
        .iter()
        .enumerate()
        .map(|(s, &p)| {
            bernoulli(150, p, &format!("h/{s}"))
                .iter()
                .map(|&b| b as u8 as f64)
                .collect()
        })
        .collect();
    let reps: Vec<Replicate> = seeds
        .iter()
        .map(|v| Replicate {
            value: v.iter().sum::<f64>() / v.len() as f64,
            items: Some(Items::flat("gsm8k", v.clone())),
        })
        .collect();
    let e = stats::estimate(&reps, "h", 20000, stats::SEED);
    let program = r#"
import json, sys, numpy as np
x = np.array(json.loads(sys.argv[1]))  # seeds x items
S, n = x.shape
rng = np.random.default_rng(11)
B = 50000
idx = rng.integers(0, n, size=(B, n))
theta = x[:, idx].mean(axis=2).T          # B x S: each seed on the same item draw
allm = theta.mean(axis=1)
pick = rng.integers(0, S, size=(B, S))
res = np.take_along_axis(theta, pick, axis=1).mean(axis=1)
d = allm + np.sqrt(S / (S - 1)) * (res - allm)
print(json.dumps([float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]))
"#;
    let out = common::python(program, &[&json!(seeds).to_string()]);
    let r: Vec<f64> = serde_json::from_str(out.trim()).unwrap();
    assert!(
        (e.lo - r[0]).abs() < 0.006 && (e.hi - r[1]).abs() < 0.006,
        "{:?} numpy {r:?}",
        (e.lo, e.hi)
    );
    // Items without noise (every item of a seed scores its seed's value): the draws' variance
    // is the unbiased s^2 / S of the seed means.
    let values = [0.31, 0.47, 0.52];
    let reps: Vec<Replicate> = values
        .iter()
        .map(|&v| Replicate {
            value: v,
            items: Some(Items::flat("x", vec![v; 40])),
        })
        .collect();
    let e = stats::estimate(&reps, "a", 20000, stats::SEED);
    let m = values.iter().sum::<f64>() / 3.0;
    let s2 = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 2.0;
    let dm = e.draws.iter().sum::<f64>() / e.draws.len() as f64;
    let var = e.draws.iter().map(|d| (d - dm).powi(2)).sum::<f64>() / e.draws.len() as f64;
    assert!(
        (var / (s2 / 3.0) - 1.0).abs() < 0.05,
        "bootstrap variance {var} against s^2/S {}",
        s2 / 3.0
    );
}
