//! The `svd` stage on real training runs: full finetuning's change is of high rank, a LoRA
//! adapter's change has numerical rank <= r, and the Gaussian controls behave as the paper's.

mod common;

use common::{Workspace, assert_ok, output_named};

const PIPELINE: &str = r#"[pipeline]
name = "svd-test"
seed = 9

[stage.world]
kind = "synthetic"
domain = "general"
docs = 400
pairs = 10
eval = 4
heldout = 4

[stage.tokenizer]
kind = "tokenize"
vocab_size = 400
train_data = ["world.cpt"]

[stage.tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world.cpt"]

[stage.rows]
kind = "pack"
tokens = "tokens.tokens"
seq_len = 64

[stage.base]
kind = "model"
tokenizer = "tokenizer.tokenizer"
hidden_size = 64
layers = 2
heads = 4
kv_heads = 2
max_positions = 64

[stage.full]
kind = "train-full"
model = "base"
data = "rows"
lr = 1e-3
steps = 10
global_batch = 8

[stage.lora]
kind = "train-lora"
model = "base"
data = "rows"
lr = 1e-2
rank = 4
steps = 10
global_batch = 8

[stage.svd_full]
kind = "svd"
base = "base"
finetuned = "full"
control_log10_c = [-4, -2, 0]

[stage.svd_lora]
kind = "svd"
base = "base"
adapter = "lora.adapter"
controls = false
"#;

fn ranks(ws: &Workspace, p: &std::path::Path, stage: &str) -> Vec<Vec<String>> {
    let dir = output_named(ws, p, stage, "spectra");
    std::fs::read_to_string(dir.join("ranks.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn full_finetuning_changes_are_high_rank_and_lora_changes_are_rank_r() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", PIPELINE);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));

    // 2 layers x 7 modules each.
    let lora = ranks(&ws, &p, "svd_lora");
    assert_eq!(lora.len(), 14);
    for r in &lora {
        let numerical: usize = r[10].parse().unwrap();
        let rank90: usize = r[4].parse().unwrap();
        assert!(
            (1..=4).contains(&numerical),
            "LoRA delta numerical rank {numerical}: {r:?}"
        );
        assert!(rank90 <= 4);
    }
    let full = ranks(&ws, &p, "svd_full");
    assert_eq!(full.len(), 14);
    for r in &full {
        let (rows, cols): (usize, usize) = (r[2].parse().unwrap(), r[3].parse().unwrap());
        let numerical: usize = r[10].parse().unwrap();
        let rank90: usize = r[4].parse().unwrap();
        assert!(
            numerical * 10 >= rows.min(cols) * 9,
            "full finetuning's delta is of (nearly) full rank: {r:?}"
        );
        assert!(rank90 > 4, "rank@90 of a full finetuning delta: {r:?}");
        // Base and finetuned weights are of high rank too; Frobenius norms are positive.
        let fro_delta: f64 = r[11].parse().unwrap();
        let fro_base: f64 = r[12].parse().unwrap();
        assert!(fro_delta > 0.0 && fro_delta < fro_base);
    }

    // Spectra are stored for every matrix, in non-increasing order.
    let dir = output_named(&ws, &p, "svd_full", "spectra");
    let bytes = std::fs::read(dir.join("spectra.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st
        .tensor("model.layers.1.mlp.down_proj.weight.delta")
        .unwrap();
    let s: Vec<f32> = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(s.len(), 64);
    assert!(s.windows(2).all(|w| w[0] >= w[1]));

    // Controls: A + cB drifts from A as c grows; cB alone is of full rank at every c.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let c = summary["controls"]["c"].as_array().unwrap();
    let diffs: Vec<f64> = c
        .iter()
        .map(|x| x["mean_abs_diff_A_vs_A_plus_cB"].as_f64().unwrap())
        .collect();
    assert!(diffs[0] < diffs[1] && diffs[1] < diffs[2], "{diffs:?}");
    assert!(
        diffs[0] < 1e-3,
        "c = 1e-4 barely moves the spectrum: {diffs:?}"
    );
    let rank_a = summary["controls"]["rank_A"].as_u64().unwrap();
    for x in c {
        assert!(
            x["rank_cB"].as_u64().unwrap() == rank_a
                || x["rank_cB"].as_u64().unwrap().abs_diff(rank_a) <= 2
        );
    }
    assert_eq!(summary["finetuned"]["kind"], "model");
}

/// A model file from outside whose weight matrix is stored 1-D: a clear error naming the
/// tensor, not an index panic.
#[test]
fn a_weight_that_is_not_a_matrix_is_an_error_naming_it() {
    let ws = Workspace::new();
    ws.write(
        "flatten.py",
        r#"import json, struct, sys
path, name = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
shape = header[name]["shape"]
header[name]["shape"] = [shape[0] * shape[1]]
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
open(path, "wb").write(struct.pack("<Q", len(text)) + text + data[8 + n:])
"#,
    );
    let head = PIPELINE.split("[stage.full]").next().unwrap();
    let text = format!(
        r#"{head}
[stage.bad]
kind = "command"
run = "cp -r $FLOW_IN_M/. $FLOW_OUT/ && chmod -R u+w $FLOW_OUT && python3 flatten.py $FLOW_OUT/model.safetensors model.layers.0.self_attn.q_proj.weight"
inputs = {{ m = "base" }}

[stage.svd_bad]
kind = "svd"
base = "bad"
finetuned = "base"
controls = false
"#
    );
    let p = ws.write("p.toml", &text);
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("model.layers.0.self_attn.q_proj.weight")
            && stderr.contains("two non-zero dimensions"),
        "{stderr}"
    );
}
