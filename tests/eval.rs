//! The `eval` stage end to end through the real binary: every task on synthetic and real
//! data, results that agree with training's own held-out loss, and errors that name the
//! file, line and field.

mod common;

use std::path::Path;

use common::{Workspace, assert_ok, output_named, parse_lines, shared_data};

fn source(name: &str, rel: &str, format: &str, limit: usize) -> String {
    format!(
        "[stage.{name}]\nkind = \"source\"\nfiles = [{:?}]\nformat = \"{format}\"\nlimit = {limit}\n\n",
        shared_data(rel).display().to_string()
    )
}

fn pipeline() -> String {
    let mut p = String::from(
        r#"[pipeline]
name = "eval-test"
seed = 3

[stage.world]
kind = "synthetic"
domain = ["general", "math", "code"]
sweep = ["domain"]
docs = 400
pairs = 40
eval = 12
heldout = 24

[stage.tokenizer]
kind = "tokenize"
vocab_size = 512
train_data = ["world.cpt"]

[stage.tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world[domain=general].cpt"]

[stage.rows]
kind = "pack"
tokens = "tokens.tokens"
seq_len = 64

[stage.held_tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world[domain=general].heldout"]

[stage.held_rows]
kind = "pack"
tokens = "held_tokens.tokens"
seq_len = 64

[stage.base]
kind = "model"
tokenizer = "tokenizer.tokenizer"
hidden_size = 64
layers = 2
heads = 4
kv_heads = 2
max_positions = 512

[stage.train]
kind = "train-full"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 3e-3
optimizer = "adamw"
steps = 12
global_batch = 8

[stage.eval]
kind = "eval"
model = "train"
tasks = ["perplexity", "gsm8k", "humaneval", "forgetting"]
perplexity = ["held_rows"]
gsm8k = "world[domain=math].eval"
gsm8k_fewshot = "world[domain=math].ift"
gsm8k_shots = 2
humaneval = "world[domain=code].eval"
samples = 3
temperature = 0.8
max_new_tokens = 24
choice = ["world[domain=general].eval", "hellaswag.train", "arc.train", "winogrande.train"]
choice_shots = 1
limit = 8
batch = 4

[stage.ppl]                          # no limit: every held-out row, as training scores them
kind = "eval"
model = "train"
tasks = ["perplexity"]
perplexity = ["held_rows"]

"#,
    );
    p += &source(
        "hellaswag",
        "hellaswag/hellaswag_val.jsonl.gz",
        "hellaswag",
        8,
    );
    p += &source("arc", "arc/arc_challenge.jsonl", "arc", 8);
    p += &source("winogrande", "winogrande/winogrande.jsonl", "winogrande", 8);
    p
}

fn metrics(ws: &Workspace, p: &Path, stage: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let dir = output_named(ws, p, stage, "results");
    let m = serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap());
    let samples = parse_lines(&std::fs::read(dir.join("samples.jsonl")).unwrap());
    (m.unwrap(), samples)
}

#[test]
fn eval_runs_every_task_and_agrees_with_training() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline());
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let (m, samples) = metrics(&ws, &p, "eval");
    let t = &m["tasks"];

    // Perplexity on the held-out rows is the loss training logged for them at its end.
    let curve =
        std::fs::read_to_string(output_named(&ws, &p, "train", "curve").join("curve.csv")).unwrap();
    let last = curve.lines().last().unwrap().split(',').collect::<Vec<_>>();
    let train_heldout: f64 = last[5].parse().unwrap();
    let (pm, _) = metrics(&ws, &p, "ppl");
    let ppl = &pm["tasks"]["perplexity"]["held_rows"];
    let loss = ppl["loss"].as_f64().unwrap();
    assert!(
        (loss - train_heldout).abs() < 1e-4 * train_heldout,
        "eval {loss} vs training's held-out {train_heldout}"
    );
    assert!((ppl["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp());
    assert!(ppl["tokens"].as_u64().unwrap() > 500);
    let limited = &t["perplexity"]["held_rows"];
    assert_eq!(limited["rows"], 8);
    assert!(limited["tokens"].as_u64() < ppl["tokens"].as_u64());

    // GSM8K: 8 items (limit), two filters, a sample line each with the 2-shot prompt.
    assert_eq!(t["gsm8k"]["n"], 8);
    let gsm: Vec<_> = samples.iter().filter(|s| s["task"] == "gsm8k").collect();
    assert_eq!(gsm.len(), 8);
    for s in &gsm {
        let prompt = s["prompt"].as_str().unwrap();
        assert_eq!(prompt.matches("Question: ").count(), 3, "{prompt}");
        assert!(prompt.ends_with("\nAnswer:"));
        assert!(!s["completion"].as_str().unwrap().contains("Question:"));
    }
    let strict = gsm.iter().filter(|s| s["correct_strict"] == true).count();
    assert_eq!(
        t["gsm8k"]["strict_match"].as_f64().unwrap(),
        strict as f64 / 8.0
    );

    // HumanEval: 8 problems x 3 samples, each executed; pass@1 and pass@3 reported.
    let he = &t["humaneval"];
    assert_eq!(
        (he["n"].as_u64(), he["samples"].as_u64()),
        (Some(8), Some(3))
    );
    let he_samples: Vec<_> = samples
        .iter()
        .filter(|s| s["task"] == "humaneval")
        .collect();
    assert_eq!(he_samples.len(), 24);
    let passed = he_samples.iter().filter(|s| s["passed"] == true).count();
    assert_eq!(he["passed_samples"].as_u64().unwrap() as usize, passed);
    assert!(he.get("pass@1").is_some() && he.get("pass@5").is_none());
    assert!((he["pass@1"].as_f64().unwrap() - passed as f64 / 24.0).abs() < 1e-12);
    for s in &he_samples {
        let result = s["result"].as_str().unwrap();
        assert!(result == "passed" || result.starts_with("failed") || result == "timed out");
    }
    let div = he["diversity"]["unique_per_problem"].as_f64().unwrap();
    assert!((1.0..=3.0).contains(&div), "diversity {div}");

    // Multiple choice: synthetic items (three styles) and the real files, grouped by style.
    for style in ["hellaswag", "arc", "winogrande"] {
        let r = &t[style];
        assert!(r["n"].as_u64().unwrap() >= 8, "{style}: {r}");
        for metric in ["acc", "acc_norm", "acc_ppl"] {
            let v = r[metric].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v));
        }
    }
    let f = &t["forgetting"];
    let mean = ["hellaswag", "arc", "winogrande"]
        .iter()
        .map(|s| t[s]["acc"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    assert!((f["score"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert_eq!(f["metric"], "acc");
    // Every choice line: the prediction is the argmax of its log-likelihoods.
    for s in samples.iter().filter(|s| s.get("loglikelihoods").is_some()) {
        let lls: Vec<f64> = s["loglikelihoods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(lls.iter().all(|l| l.is_finite() && *l < 0.0));
        let best = (0..lls.len()).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
        assert_eq!(s["pred_acc"].as_u64().unwrap() as usize, best);
    }
    // Provenance: the model's digest and each input's.
    assert_eq!(m["model"]["stage"], "train");
    assert_eq!(m["model"]["digest"].as_str().unwrap().len(), 64);
    assert_eq!(m["data"]["multiple_choice"].as_array().unwrap().len(), 4);

    // Same seed, same numbers: a second workspace reproduces the metrics file exactly.
    let ws2 = Workspace::new();
    let p2 = ws2.write("p.toml", &pipeline());
    assert_ok(&ws2.flow(&["run", p2.to_str().unwrap()]));
    assert_eq!(metrics(&ws2, &p2, "eval").0, m);
}

#[test]
fn eval_errors_name_the_file_line_and_field() {
    let ws = Workspace::new();
    // A GSM8K file whose second row lacks its answer.
    ws.write(
        "gsm.jsonl",
        "{\"question\": \"1+1?\", \"answer\": \"#### 2\"}\n{\"question\": \"2+2?\"}\n",
    );
    let base = r#"[stage.world]
kind = "synthetic"
domain = "general"
docs = 200
pairs = 10
eval = 6
heldout = 6

[stage.tokenizer]
kind = "tokenize"
vocab_size = 300
train_data = ["world.cpt"]

[stage.base]
kind = "model"
tokenizer = "tokenizer.tokenizer"
hidden_size = 32
layers = 1
heads = 2
max_positions = 256
"#;
    let p = ws.write(
        "p.toml",
        &format!(
            "{base}\n[stage.gsm]\nkind = \"source\"\nfiles = \"gsm.jsonl\"\nformat = \"gsm8k\"\n\n\
             [stage.eval]\nkind = \"eval\"\nmodel = \"base\"\ntasks = [\"gsm8k\"]\ngsm8k = \"gsm.train\"\n"
        ),
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gsm.jsonl:2") && err.contains("answer"),
        "{err}"
    );

    // Records of the wrong type for a task: the records file and line are named.
    let p = ws.write(
        "p.toml",
        &format!(
            "{base}\n[stage.eval]\nkind = \"eval\"\nmodel = \"base\"\ntasks = [\"gsm8k\"]\ngsm8k = \"world.eval\"\n"
        ),
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("records.jsonl:1: gsm8k needs gsm8k records, found a `choice` record"),
        "{err}"
    );

    // A task without its input is refused, naming the missing param.
    let p = ws.write(
        "p.toml",
        &format!(
            "{base}\n[stage.eval]\nkind = \"eval\"\nmodel = \"base\"\ntasks = [\"humaneval\"]\n"
        ),
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task `humaneval` needs the `humaneval` input"),
        "{err}"
    );

    // Forgetting without all three styles says which are needed.
    let p = ws.write(
        "p.toml",
        &format!(
            "{base}\n{}\n[stage.eval]\nkind = \"eval\"\nmodel = \"base\"\ntasks = [\"forgetting\"]\nchoice = [\"arc.train\"]\n",
            source("arc", "arc/arc_challenge.jsonl", "arc", 4)
        ),
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("none of style `hellaswag`"), "{err}");
}

#[test]
fn eval_on_a_wgpu_device_agrees_with_the_cpu_engine() {
    // The same study twice: the eval stages on the CPU engine, then on wgpu (lavapipe in
    // CI; no adapter fails the test). Training stays on the CPU engine in both.
    let cpu = Workspace::new();
    let p = cpu.write("p.toml", &pipeline());
    assert_ok(&cpu.flow(&["run", p.to_str().unwrap()]));
    let gpu = Workspace::new();
    let on_device = pipeline()
        .replace(
            "[stage.eval]\nkind = \"eval\"\n",
            "[stage.eval]\nkind = \"eval\"\ndevice = \"wgpu\"\n",
        )
        .replace("[stage.ppl]", "[stage.ppl]\ndevice = \"wgpu\"");
    assert!(on_device.matches("device = \"wgpu\"").count() == 2);
    let pg = gpu.write("p.toml", &on_device);
    assert_ok(&gpu.flow(&["run", pg.to_str().unwrap()]));
    let log: String = std::fs::read_dir(gpu.cache().join("logs"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    assert!(log.contains("eval device: wgpu"), "{log}");

    let (mc, sc) = metrics(&cpu, &p, "eval");
    let (mg, sg) = metrics(&gpu, &pg, "eval");
    // Same model bits (training ran on the CPU engine in both workspaces).
    assert_eq!(mc["model"], mg["model"]);
    let loss = |m: &serde_json::Value| {
        m["tasks"]["perplexity"]["held_rows"]["loss"]
            .as_f64()
            .unwrap()
    };
    assert!(
        (loss(&mc) - loss(&mg)).abs() < 1e-4 * loss(&mc),
        "{} vs {}",
        loss(&mc),
        loss(&mg)
    );
    // Accuracies are identical; every log-likelihood agrees to 1e-4.
    for style in ["hellaswag", "arc", "winogrande", "forgetting"] {
        for metric in ["acc", "acc_norm", "acc_ppl", "score"] {
            assert_eq!(
                mc["tasks"][style].get(metric),
                mg["tasks"][style].get(metric),
                "{style} {metric}"
            );
        }
    }
    let choices = |s: &[serde_json::Value]| -> Vec<Vec<f64>> {
        s.iter()
            .filter_map(|s| s.get("loglikelihoods"))
            .map(|l| {
                l.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (lc, lg) = (choices(&sc), choices(&sg));
    assert!(!lc.is_empty() && lc.len() == lg.len());
    for (c, g) in lc.iter().flatten().zip(lg.iter().flatten()) {
        assert!((c - g).abs() < 1e-4, "{c} vs {g}");
    }
    // GSM8K decodes greedily: the same completions token for token.
    let gsm = |s: &[serde_json::Value]| -> Vec<String> {
        s.iter()
            .filter(|s| s["task"] == "gsm8k")
            .map(|s| s["completion"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(gsm(&sc), gsm(&sg));
    assert_eq!(gsm(&sc).len(), 8);
}

#[test]
fn a_model_too_large_for_the_device_fails_before_loading_saying_what_it_needs() {
    // A tiny model whose context (2^30 positions) needs a 512 GiB KV cache for one sequence.
    let ws = Workspace::new();
    let mut p = String::from(
        r#"[pipeline]
name = "too-large"
seed = 1

[stage.world]
kind = "synthetic"
domain = "general"
docs = 50
pairs = 4
eval = 4
heldout = 4

[stage.tokenizer]
kind = "tokenize"
vocab_size = 320
train_data = ["world.cpt"]

[stage.base]
kind = "model"
tokenizer = "tokenizer.tokenizer"
hidden_size = 32
layers = 2
heads = 2
kv_heads = 2
max_positions = 1073741824

[stage.eval]
kind = "eval"
device = "wgpu"
model = "base"
tasks = ["multiple_choice"]
choice = ["arc"]
limit = 2

"#,
    );
    p += &source("arc", "arc/arc_challenge.jsonl", "arc", 2);
    let path = ws.write("p.toml", &p);
    let out = ws.flow(&["run", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("KV cache of one 1073741824-token sequence")
            && log.contains("needs about 512.")
            && log.contains("GiB on wgpu: ")
            && log.contains(", which has "),
        "{log}"
    );
}
