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
