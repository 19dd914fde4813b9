//! flow's CPU engine against Hugging Face `transformers` and `peft`: logits, loss and the
//! gradient of every parameter on the fixtures written by
//! `tests/fixtures/make_llama_fixtures.py` (Llama 2: GQA with an untied head, MHA with tied
//! embeddings, packed rows with a block-diagonal mask, and a PEFT LoRA adapter) and
//! `tests/fixtures/make_family_fixtures.py` (Llama 3, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2: each
//! family's variations, greedy generations with the KV-cached decoder, and PEFT adapters).

mod families;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flow_stages::cpu::batch::Batch;
use flow_stages::cpu::decode::{Decoder, Token};
use flow_stages::cpu::llama::{Llama, Trainable};
use flow_stages::cpu::lora::Adapters;
use flow_stages::cpu::ops::Rope;
use flow_stages::model::weights::Weights;
use safetensors::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama")
}

fn family(name: &str) -> PathBuf {
    families::root().join(name)
}

/// Every tensor of a safetensors file as f32 (integers converted).
fn read(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, v)| {
            let data: Vec<f32> = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("{other:?}"),
            };
            (name.to_string(), (v.shape().to_vec(), data))
        })
        .collect()
}

/// HF's labels (-100 = none) as flow's next-token targets: position t predicts label t+1.
fn batch(exp: &HashMap<String, (Vec<usize>, Vec<f32>)>, labels: &str) -> Batch {
    let (shape, ids) = &exp["input_ids"];
    let (rows, seq) = (shape[0], shape[1]);
    let labels = &exp[labels].1;
    let mut targets = vec![-1i32; rows * seq];
    for r in 0..rows {
        for t in 0..seq - 1 {
            let l = labels[r * seq + t + 1];
            if l >= 0.0 {
                targets[r * seq + t] = l as i32;
            }
        }
    }
    let pos = match exp.get("position_ids") {
        Some((_, p)) => p.iter().map(|v| *v as u32).collect(),
        None => (0..rows).flat_map(|_| 0..seq as u32).collect(),
    };
    Batch {
        rows,
        seq,
        ids: ids.iter().map(|v| *v as u32).collect(),
        targets,
        pos,
        seq_ids: exp
            .get("seq_ids")
            .map(|(_, s)| s.iter().map(|v| *v as u16).collect()),
        lens: None,
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Forward and backward against the fixture: logits, loss, then every gradient.
fn check(dir: &Path, expected: &str) {
    let model_dir = dir.display();
    let w = Weights::load(dir).unwrap();
    let exp = read(&dir.join(expected));
    let b = batch(&exp, "labels");
    let rope = Rope::new(&w.arch, 64);
    let model = Llama {
        w: &w,
        lora: None,
        rope: &rope,
        threads: 2,
    };
    let err = max_abs(&model.forward(&b, None, false).logits, &exp["logits"].1);
    assert!(
        err <= 1e-4,
        "{model_dir}/{expected}: logits max abs error {err}"
    );
    // Kept for the backward pass: the logits become probabilities in place.
    let fwd = model.forward(&b, None, true);
    let loss = fwd.loss_sum / fwd.targets as f64;
    let want = exp["loss"].1[0] as f64;
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");

    let mut grads: Vec<Vec<f32>> = w.tensors.iter().map(|t| vec![0.0; t.data.len()]).collect();
    let scale = 1.0 / fwd.targets as f32;
    model.backward(fwd, &b, scale, &Trainable::Full, &mut grads);
    // The gradients under the checkpoint's names (Phi-3's fused q/k/v and gate/up joined).
    let mut as_weights = w.clone();
    for (t, g) in as_weights.tensors.iter_mut().zip(grads) {
        t.data = g;
    }
    let stored = as_weights.stored_tensors();
    let graded = exp.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        graded,
        stored.len(),
        "{model_dir}: one gradient per parameter"
    );
    for t in &stored {
        let g = &t.data;
        let want = &exp[&format!("grad.{}", t.name)].1;
        let err = max_abs(g, want);
        let norm = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(
            err <= 1e-4 * norm.max(1.0),
            "{model_dir}: grad of {} max abs error {err} (max |g| {norm})",
            t.name
        );
    }
}

#[test]
fn gqa_logits_loss_and_gradients_match_transformers() {
    check(&fixtures().join("gqa"), "expected.safetensors");
}

#[test]
fn tied_embeddings_logits_loss_and_gradients_match_transformers() {
    check(&fixtures().join("tied"), "expected.safetensors");
}

#[test]
fn packed_rows_with_a_block_diagonal_mask_match_transformers() {
    check(&fixtures().join("gqa"), "packed.safetensors");
}

#[test]
fn peft_lora_adapter_gives_peft_logits_and_merged_weights() {
    check_adapter(&fixtures().join("gqa"));
}

/// A PEFT adapter of the model in `dir` (`lora/`): flow's adapted logits and merged weights
/// are PEFT's.
fn check_adapter(dir: &Path) {
    let w = Weights::load(dir).unwrap();
    let lora = Adapters::load(&dir.join("lora"), &w.config).unwrap();
    assert_eq!(lora.spec.rank, 4);
    // Every projection adapted: PEFT's modules (Phi-3's fused ones whole), two factors each.
    assert_eq!(lora.spec.targets.len(), 7);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let modules = config["target_modules"].as_array().unwrap().len();
    assert_eq!(lora.tensors.len(), w.config.num_hidden_layers * modules * 2);
    let exp = read(&dir.join("expected.safetensors"));
    let lexp = read(&dir.join("lora/lora_expected.safetensors"));
    let b = batch(&exp, "labels");
    let rope = Rope::new(&w.arch, 64);
    let model = Llama {
        w: &w,
        lora: Some(&lora),
        rope: &rope,
        threads: 2,
    };
    let fwd = model.forward(&b, None, false);
    let err = max_abs(&fwd.logits, &lexp["logits"].1);
    assert!(err <= 1e-4, "LoRA logits max abs error {err}");
    let base_err = max_abs(&fwd.logits, &exp["logits"].1);
    assert!(
        base_err > 1e-2,
        "the adapter changes the logits ({base_err})"
    );

    let merged = lora.merge(&w);
    // Under the checkpoint's names (Phi-3's fused tensors joined).
    for t in &merged.stored_tensors() {
        let want = &lexp[&format!("merged.{}", t.name)].1;
        let err = max_abs(&t.data, want);
        assert!(err <= 1e-5, "{}: merged {}: {err}", dir.display(), t.name);
    }
    // The merged model computes what the adapted one does.
    let m2 = Llama {
        w: &merged,
        lora: None,
        rope: &rope,
        threads: 1,
    };
    let err = max_abs(&m2.forward(&b, None, false).logits, &lexp["logits"].1);
    assert!(err <= 1e-4, "merged logits {err}");
}

#[test]
fn saved_models_and_adapters_reload_bit_exactly() {
    let dir = fixtures().join("gqa");
    let w = Weights::load(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    w.save(&tmp.path().join("single"), None).unwrap();
    assert_eq!(Weights::load(&tmp.path().join("single")).unwrap(), w);
    // Sharded: several files and an index.
    w.save(&tmp.path().join("sharded"), Some(20_000)).unwrap();
    let files = std::fs::read_dir(tmp.path().join("sharded"))
        .unwrap()
        .count();
    assert!(files > 3, "{files} files");
    assert!(
        tmp.path()
            .join("sharded/model.safetensors.index.json")
            .is_file()
    );
    assert_eq!(Weights::load(&tmp.path().join("sharded")).unwrap(), w);
    let lora = Adapters::load(&dir.join("lora"), &w.config).unwrap();
    lora.save(&tmp.path().join("adapter"), Some("base"))
        .unwrap();
    assert_eq!(
        Adapters::load(&tmp.path().join("adapter"), &w.config).unwrap(),
        lora
    );
}

#[test]
fn every_family_matches_transformers_logits_loss_and_gradients() {
    for name in families::names() {
        check(&family(&name), "expected.safetensors");
        if family(&name).join("packed.safetensors").is_file() {
            check(&family(&name), "packed.safetensors");
        }
    }
}

#[test]
fn every_familys_peft_adapter_gives_peft_logits_and_merged_weights() {
    for name in families::names() {
        check_adapter(&family(&name));
    }
}

/// An adapter flow saves is PEFT's: the same tensor names and shapes as the adapter PEFT
/// wrote for the family (Phi-3's on `qkv_proj` and `gate_up_proj`), the same
/// `target_modules`, and it reloads bit-exactly. With `FLOW_EXPORT_ADAPTERS=DIR`, each
/// family's adapter (B nonzero) and flow's merged model are also written to `DIR/FAMILY/`
/// for the by-hand check in PEFT itself:
/// `make_llama_fixtures.py --verify-adapter BASE DIR/FAMILY/adapter DIR/FAMILY/merged`.
#[test]
fn every_familys_adapter_saves_under_peft_names() {
    use flow_stages::cpu::lora::LoraInit;
    for name in families::names() {
        let dir = family(&name);
        let w = Weights::load(&dir).unwrap();
        let mut fresh = Adapters::init(&w.config, &families::peft_spec(), LoraInit::Kaiming, 1);
        for t in fresh
            .tensors
            .iter_mut()
            .filter(|t| t.name.contains("lora_B"))
        {
            for (i, v) in t.data.iter_mut().enumerate() {
                *v = ((i % 5) as f32 - 2.0) * 0.1;
            }
        }
        if let Some(out) = std::env::var_os("FLOW_EXPORT_ADAPTERS") {
            let out = Path::new(&out).join(&name);
            fresh.save(&out.join("adapter"), None).unwrap();
            fresh.merge(&w).save(&out.join("merged"), None).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        fresh.save(tmp.path(), None).unwrap();
        let shapes = |d: &Path| -> Vec<(String, Vec<usize>)> {
            let mut v: Vec<(String, Vec<usize>)> = read(&d.join("adapter_model.safetensors"))
                .into_iter()
                .map(|(n, (s, _))| (n, s))
                .collect();
            v.sort();
            v
        };
        assert_eq!(shapes(tmp.path()), shapes(&dir.join("lora")), "{name}");
        let modules = |d: &Path| -> Vec<String> {
            let c: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(d.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            let mut m: Vec<String> = c["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            m.sort();
            m
        };
        assert_eq!(modules(tmp.path()), modules(&dir.join("lora")), "{name}");
        assert_eq!(
            Adapters::load(tmp.path(), &w.config).unwrap(),
            fresh,
            "{name}"
        );
    }
}

/// The KV-cached decoder's greedy continuation is `generate`'s, token for token, past the
/// sliding windows (Mistral's 5 keys, Qwen2's 6 on its upper layer).
#[test]
fn every_familys_cached_greedy_generation_matches_transformers() {
    for name in families::names() {
        let dir = family(&name);
        let w = Weights::load(&dir).unwrap();
        let exp = read(&dir.join("generate.safetensors"));
        let prompt: Vec<u32> = exp["prompt"].1.iter().map(|v| *v as u32).collect();
        let want: Vec<u32> = exp["generated"].1.iter().map(|v| *v as u32).collect();
        let mut dec = Decoder::new(&w, 1, 64, 2);
        let vocab = w.config.vocab_size;
        let tokens: Vec<Token> = prompt
            .iter()
            .enumerate()
            .map(|(i, &id)| Token {
                slot: 0,
                id,
                logits: i + 1 == prompt.len(),
            })
            .collect();
        let mut logits = dec.feed(&tokens).unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = logits[..vocab]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .unwrap()
                .0 as u32;
            got.push(next);
            logits = dec
                .feed(&[Token {
                    slot: 0,
                    id: next,
                    logits: true,
                }])
                .unwrap();
        }
        assert_eq!(got, want, "{name}: greedy continuation");
    }
}

/// Phi-3's LongRoPE runs on its short factors, within `original_max_position_embeddings`
/// (16 here): past it transformers switches to the long factors, which flow lacks, so the
/// decoder refuses the 17th position rather than compute something else.
#[test]
fn longrope_models_run_within_their_original_positions() {
    let w = Weights::load(&family("phi3_longrope")).unwrap();
    assert_eq!(
        (w.config.max_position_embeddings, w.arch.positions),
        (64, 16)
    );
    assert!((w.arch.rope_factor - 1.5f32.sqrt()).abs() < 1e-6);
    let mut dec = Decoder::new(&w, 1, 64, 1);
    assert_eq!(dec.max_len(), 16);
    let tokens: Vec<Token> = (0..16)
        .map(|i| Token {
            slot: 0,
            id: i,
            logits: false,
        })
        .collect();
    dec.feed(&tokens).unwrap();
    let e = dec
        .feed(&[Token {
            slot: 0,
            id: 1,
            logits: true,
        }])
        .unwrap_err();
    assert!(e.contains("16 tokens"), "{e}");
}

/// A saved family model reloads bit-exactly and keeps its family's config fields and tensor
/// names, so `transformers` reads it back as the same architecture.
#[test]
fn saved_family_models_reload_with_their_config() {
    for name in families::names() {
        let w = Weights::load(&family(&name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        w.save(tmp.path(), None).unwrap();
        assert_eq!(Weights::load(tmp.path()).unwrap(), w, "{name}");
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
                .unwrap();
        let given: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(family(&name).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved["model_type"], given["model_type"]);
        // The tensors keep the family's names: Phi-3's q/k/v and gate/up fused again.
        let names = |dir: &Path| -> Vec<String> {
            let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
            let mut n: Vec<String> = SafeTensors::deserialize(&bytes)
                .unwrap()
                .names()
                .into_iter()
                .map(str::to_string)
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(tmp.path()),
            names(&family(&name)),
            "{name}: tensor names"
        );
        assert_eq!(saved["architectures"], given["architectures"]);
        // (null and absent are the same to transformers; flow leaves nulls out)
        let null = serde_json::Value::Null;
        for field in [
            "sliding_window",
            "layer_types",
            "head_dim",
            "tie_word_embeddings",
        ] {
            let (a, b) = (saved.get(field), given.get(field));
            assert_eq!(a.unwrap_or(&null), b.unwrap_or(&null), "{name}: {field}");
        }
    }
}

/// Phi-3's fused tensors are checked whole against the config where they enter: a
/// `qkv_proj` with a row too many (or a `gate_up_proj` one short) is an error naming the
/// tensor and the shape the config implies, on load and when read by name for the SVD.
#[test]
fn a_fused_tensor_of_the_wrong_shape_is_a_named_error() {
    use flow_stages::model::weights::{Tensor, TensorFiles};
    let src = family("phi3");
    let stored = read(&src.join("model.safetensors"));
    for (bad, delta) in [
        ("model.layers.0.self_attn.qkv_proj.weight", 1isize),
        ("model.layers.1.mlp.gate_up_proj.weight", -1),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let tensors: Vec<Tensor> = stored
            .iter()
            .map(|(name, (shape, data))| {
                let (mut shape, mut data) = (shape.clone(), data.clone());
                if name == bad {
                    let cols = shape[1];
                    let rows = (shape[0] as isize + delta) as usize;
                    data.resize(rows * cols, 0.5);
                    shape[0] = rows;
                }
                Tensor {
                    name: name.clone(),
                    shape,
                    data,
                }
            })
            .collect();
        safetensors::serialize_to_file(
            tensors.iter().map(|t| (t.name.as_str(), t)),
            None,
            &tmp.path().join("model.safetensors"),
        )
        .unwrap();
        let e = Weights::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(bad) && e.contains("config.json implies"), "{e}");
        let part = if bad.contains("qkv") {
            "model.layers.0.self_attn.k_proj.weight"
        } else {
            "model.layers.1.mlp.up_proj.weight"
        };
        let files = TensorFiles::open(tmp.path()).unwrap();
        let e = files.read(part).unwrap_err().to_string();
        assert!(e.contains(bad) && e.contains("config.json implies"), "{e}");
    }
}
