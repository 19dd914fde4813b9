//! `tokenize` against the Python `tokenizers` package, and `pack`'s rows against the token
//! stream they came from.

mod common;

use std::path::Path;

use common::{Workspace, output_named, python, records};
use flow_stages::data::pack::Packed;
use flow_stages::data::tokens::TokenFile;

const PIPELINE: &str = r#"
[stage.world]
kind = "synthetic"
domain = "math"
docs = 400
pairs = 200
eval = 20
heldout = 10
seed = 3

[stage.tok]
kind = "tokenize"
vocab_size = 600
train_data = ["world.cpt"]

[stage.cpt_tokens]
kind = "tokenize"
tokenizer = "tok.tokenizer"
data = ["world.cpt"]

[stage.ift_tokens]
kind = "tokenize"
tokenizer = "tok.tokenizer"
data = ["world.ift"]
template = ["plain", "llama2"]
sweep = ["template"]

[stage.cpt_rows]
kind = "pack"
tokens = "cpt_tokens.tokens"
seq_len = 64
shuffle = false

[stage.ift_rows]
kind = "pack"
tokens = "ift_tokens[template=plain].tokens"
seq_len = 256
mode = "ift"
shuffle = false
"#;

/// Encodes records with Python's tokenizers the way flow lays them out:
/// `[BOS] template(prompt) template(response) [EOS]`, prompt and response encoded apart.
const PY_ENCODE: &str = r####"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
template = sys.argv[3]
bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
for line in open(sys.argv[2]):
    r = json.loads(line)
    if r["type"] == "text":
        prompt, response = "", r["text"]
    else:
        prompt, response = r["prompt"], r["response"]
    if prompt and template == "plain":
        prompt = "### Instruction:\n" + prompt + "\n\n### Response:\n"
    elif prompt and template == "llama2":
        prompt, response = "[INST] " + prompt.strip() + " [/INST]", " " + response.strip()
    p = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = [bos] + p + tok.encode(response, add_special_tokens=False).ids + [eos]
    assert tok.decode(ids[1 + len(p):-1]) == response, "byte-level BPE round trip"
    print(json.dumps({"ids": ids, "prompt_len": 1 + len(p) if p else 0}))
"####;

/// A workspace that has run PIPELINE plus `extra` stage tables.
fn run_with(extra: &str) -> (Workspace, std::path::PathBuf) {
    let ws = Workspace::new();
    let p = ws.write("p.toml", &format!("{PIPELINE}\n{extra}"));
    ws.run_statuses(&p, &[]);
    (ws, p)
}

fn compare_with_python(tokens: &Path, tokenizer: &Path, data: &Path, template: &str) {
    let reference = python(
        PY_ENCODE,
        &[
            tokenizer.join("tokenizer.json").to_str().unwrap(),
            data.join("records.jsonl").to_str().unwrap(),
            template,
        ],
    );
    let reference = common::parse_lines(reference.as_bytes());
    let tf = TokenFile::open(tokens).unwrap();
    assert_eq!(tf.docs(), reference.len());
    assert!(tf.docs() > 100);
    for (i, r) in reference.iter().enumerate() {
        let want: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tf.doc(i), want, "document {i}");
        assert_eq!(
            tf.prompt_len(i) as u64,
            r["prompt_len"].as_u64().unwrap(),
            "document {i}"
        );
    }
}

#[test]
fn tokens_match_python_tokenizers_and_packs_preserve_them() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", PIPELINE);
    ws.run_statuses(&p, &[]);
    let tokenizer = output_named(&ws, &p, "tok", "tokenizer");
    let cpt = output_named(&ws, &p, "world", "cpt");
    let ift = output_named(&ws, &p, "world", "ift");
    compare_with_python(
        &output_named(&ws, &p, "cpt_tokens", "tokens"),
        &tokenizer,
        &cpt,
        "plain",
    );
    for t in ["plain", "llama2"] {
        let stage = format!("ift_tokens[template={t}]");
        compare_with_python(
            &output_named(&ws, &p, &stage, "tokens"),
            &tokenizer,
            &ift,
            t,
        );
    }

    // CPT rows are the token stream cut into windows, in order (no shuffle), remainder dropped.
    let tf = TokenFile::open(&output_named(&ws, &p, "cpt_tokens", "tokens")).unwrap();
    let stream: Vec<u32> = (0..tf.docs()).flat_map(|i| tf.doc(i)).collect();
    let packed = Packed::open(&output_named(&ws, &p, "cpt_rows", "packed")).unwrap();
    let rows = packed.rows().unwrap();
    assert_eq!(rows.len(), stream.len() / 64);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.ids.clone()).collect();
    assert_eq!(flat[..], stream[..flat.len()]);
    assert!(rows.iter().all(|r| r.mask.iter().all(|&m| m == 1)));
    assert_eq!(packed.summary.efficiency, 1.0);
    let eos = tf.meta.eos_id;
    for r in &rows {
        for k in 1..64 {
            let boundary = r.ids[k - 1] == eos;
            assert_eq!(
                r.seq[k],
                r.seq[k - 1] + boundary as u16,
                "seq ids step after EOS"
            );
        }
    }

    // IFT rows: whole examples, prompt tokens masked, responses trained on.
    let tf = TokenFile::open(&output_named(
        &ws,
        &p,
        "ift_tokens[template=plain]",
        "tokens",
    ))
    .unwrap();
    let packed = Packed::open(&output_named(&ws, &p, "ift_rows", "packed")).unwrap();
    let rows = packed.rows().unwrap();
    let mut seen = Vec::new();
    let mut targets = 0u64;
    for r in &rows {
        let mut k = 0;
        while k < 256 && r.seq[k] != 0 {
            let id = r.seq[k];
            let start = k;
            while k < 256 && r.seq[k] == id {
                k += 1;
            }
            let example = &r.ids[start..k];
            let doc = (0..tf.docs())
                .find(|&d| tf.doc(d) == example)
                .expect("an example is a whole document");
            let pl = tf.prompt_len(doc) as usize;
            for (j, &m) in r.mask[start..k].iter().enumerate() {
                assert_eq!(m == 1, j >= pl.max(1), "doc {doc} token {j} (prompt {pl})");
            }
            targets += r.mask[start..k].iter().map(|&m| m as u64).sum::<u64>();
            seen.push(doc);
        }
        assert!(
            r.ids[k..].iter().all(|&t| t == tf.meta.pad_id) && r.mask[k..].iter().all(|&m| m == 0)
        );
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..tf.docs()).collect::<Vec<_>>(),
        "every example packed exactly once"
    );
    assert_eq!(packed.summary.target_tokens, targets);
    assert!(rows.len() < tf.docs(), "first-fit-decreasing shares rows");
    let expected = tf.meta.tokens as f64 / (rows.len() * 256) as f64;
    assert!((packed.summary.efficiency - expected).abs() < 1e-12);
    // First fit leaves no two rows both at most half full (the later one's examples would
    // have fitted in the earlier), so rows <= 2 * tokens / 256 + 1; and these short math
    // examples pack well above that (0.76 with this world's lengths).
    assert!(
        rows.len() as f64 <= 2.0 * tf.meta.tokens as f64 / 256.0 + 1.0,
        "{} rows for {} tokens",
        rows.len(),
        tf.meta.tokens
    );
    assert!(
        packed.summary.efficiency > 0.7,
        "{}",
        packed.summary.efficiency
    );
}

#[test]
fn overlong_examples_are_truncated_or_dropped_and_counted() {
    let (ws, p) = run_with(
        "\n[stage.short]\nkind = \"pack\"\ntokens = \"ift_tokens[template=plain].tokens\"\nseq_len = 110\nmode = \"ift\"\noverlong = [\"truncate\", \"drop\"]\nsweep = [\"overlong\"]\n",
    );
    let tf = TokenFile::open(&output_named(
        &ws,
        &p,
        "ift_tokens[template=plain]",
        "tokens",
    ))
    .unwrap();
    let long = (0..tf.docs())
        .filter(|&d| tf.doc_range(d).len() > 110)
        .count();
    assert!(
        long > 0 && long < tf.docs(),
        "{long} of {} are long",
        tf.docs()
    );
    let t = Packed::open(&output_named(&ws, &p, "short[overlong=truncate]", "packed")).unwrap();
    let d = Packed::open(&output_named(&ws, &p, "short[overlong=drop]", "packed")).unwrap();
    assert_eq!(t.summary.truncated as usize, long);
    assert_eq!(d.summary.dropped as usize, long);
    assert_eq!(d.summary.examples as usize, tf.docs() - long);
    // Reading the record artifact confirms the counts are of real examples.
    assert_eq!(
        records(&output_named(&ws, &p, "world", "ift")).len(),
        tf.docs()
    );
}

#[test]
fn a_saved_tokenizer_json_loads_as_a_file_and_encodes_identically() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", PIPELINE);
    ws.run_statuses(&p, &[]);
    let json = output_named(&ws, &p, "tok", "tokenizer").join("tokenizer.json");
    std::fs::copy(&json, ws.path().join("tokenizer.json")).unwrap();
    let mut text = PIPELINE.to_string();
    text.push_str("\n[stage.from_file]\nkind = \"tokenize\"\ntokenizer_file = \"tokenizer.json\"\ndata = [\"world.cpt\"]\n");
    let p = ws.write("p.toml", &text);
    ws.run_statuses(&p, &[]);
    let a = output_named(&ws, &p, "from_file", "tokens");
    let b = output_named(&ws, &p, "cpt_tokens", "tokens");
    assert_eq!(a, b, "same content, same artifact");
}

/// Pieces of the trained vocabulary that hold a digit, by how they hold it (Python tokenizers
/// reads the file): digits alone, and pieces with a digit beside anything else.
const PY_DIGIT_PIECES: &str = r####"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
pieces = [p for p in tok.get_vocab() if any(c in "0123456789" for c in p)]
mixed = [p for p in pieces if len(p) > 1]
print(json.dumps({"digits": len(pieces) - len(mixed), "mixed": len(mixed),
                  "ids": tok.encode("Tom has 128 apples.").tokens}))
"####;

#[test]
fn trained_tokenizers_split_digits_as_llama2_unless_told_not_to() {
    let extra = "[stage.no_split]\nkind = \"tokenize\"\nvocab_size = 600\nsplit_digits = false\ntrain_data = [\"world.cpt\"]\n";
    let (ws, p) = run_with(extra);
    let pieces = |stage: &str| {
        let json = output_named(&ws, &p, stage, "tokenizer").join("tokenizer.json");
        let out = python(PY_DIGIT_PIECES, &[json.to_str().unwrap()]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let split = pieces("tok");
    assert_eq!(split["digits"], 10, "{split}");
    assert_eq!(
        split["mixed"], 0,
        "no piece joins a digit to anything: {split}"
    );
    let ids: Vec<&str> = split["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        ids.windows(5).any(|w| w == ["Ġ", "1", "2", "8", "Ġapples"]),
        "Llama-2's layout: the space alone, then one token per digit: {ids:?}"
    );
    let whole = pieces("no_split");
    assert!(
        whole["mixed"].as_u64().unwrap() > 20,
        "the math corpus's numbers merge without the split: {whole}"
    );
}

#[test]
fn cpt_repeats_the_corpus_up_to_a_token_budget() {
    let (ws, p) = run_with(
        "\n[stage.budget]\nkind = \"pack\"\ntokens = \"cpt_tokens.tokens\"\nseq_len = 64\ntotal_tokens = 60000\n",
    );
    let tf = TokenFile::open(&output_named(&ws, &p, "cpt_tokens", "tokens")).unwrap();
    let corpus = tf.meta.tokens;
    assert!(
        corpus * 2 < 60000 && corpus * 3 >= 60000,
        "corpus of {corpus} tokens"
    );
    let packed = Packed::open(&output_named(&ws, &p, "budget", "packed")).unwrap();
    assert_eq!(
        packed.summary.epochs, 3,
        "two full passes and part of a third"
    );
    assert_eq!(packed.summary.rows, 60000_usize.div_ceil(64));
    // Every token of the corpus is seen at least twice, in the same proportions.
    let mut counts = std::collections::HashMap::new();
    for row in packed.rows().unwrap() {
        for t in row.ids {
            *counts.entry(t).or_insert(0u64) += 1;
        }
    }
    let mut once = std::collections::HashMap::new();
    for d in 0..tf.docs() {
        for t in tf.doc(d) {
            *once.entry(t).or_insert(0u64) += 1;
        }
    }
    for (t, n) in &once {
        let seen = counts.get(t).copied().unwrap_or(0);
        assert!(
            seen >= 2 * n && seen <= 3 * n,
            "token {t}: {seen} vs {n} per pass"
        );
    }
}

#[test]
fn cpt_remainder_is_padded_on_request() {
    let (ws, p) = run_with(
        "\n[stage.padded]\nkind = \"pack\"\ntokens = \"cpt_tokens.tokens\"\nseq_len = 64\nremainder = \"pad\"\nshuffle = false\n",
    );
    let tf = TokenFile::open(&output_named(&ws, &p, "cpt_tokens", "tokens")).unwrap();
    let total = tf.meta.tokens as usize;
    assert_ne!(total % 64, 0, "the corpus leaves a remainder");
    let packed = Packed::open(&output_named(&ws, &p, "padded", "packed")).unwrap();
    let rows = packed.rows().unwrap();
    assert_eq!(rows.len(), total.div_ceil(64));
    let last = rows.last().unwrap();
    let used = total % 64;
    assert!(last.ids[used..].iter().all(|&t| t == tf.meta.pad_id));
    assert!(last.mask[used..].iter().all(|&m| m == 0) && last.seq[used..].iter().all(|&s| s == 0));
    assert!(last.mask[..used].iter().all(|&m| m == 1));
    assert_eq!(packed.summary.tokens as usize, total);
}

/// Runs a source of `records` (JSON lines in `format`) and a tokenize stage with the
/// tokenizer.json in `dir` (and `extra` params), in order and without an eval split; returns
/// its token file (and the workspace holding it).
fn tokenize_records(
    records: &[serde_json::Value],
    format: &str,
    dir: &Path,
    extra: &str,
) -> (Workspace, TokenFile) {
    let ws = Workspace::new();
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    ws.write("records.jsonl", &(lines.join("\n") + "\n"));
    let p = ws.write(
        "p.toml",
        &format!(
            "[stage.records]\nkind = \"source\"\nfiles = \"records.jsonl\"\nformat = \"{format}\"\neval_fraction = 0.0\n\n\
             [stage.tok]\nkind = \"tokenize\"\ntokenizer_file = \"{}\"\ndata = [\"records.train\"]\n{extra}",
            dir.join("tokenizer.json").display()
        ),
    );
    let statuses = ws.run_statuses(&p, &[]);
    assert!(
        statuses.iter().all(|(_, s)| s == "ran"),
        "{}: {statuses:?}",
        dir.display()
    );
    let tf = TokenFile::open(&output_named(&ws, &p, "tok", "tokens")).unwrap();
    (ws, tf)
}

/// `template = "chat"` lays records out with the tokenizer's own chat template as
/// transformers' `apply_chat_template` does (fixtures by tests/fixtures/make_family_fixtures.py,
/// a ChatML template without BOS, and a header template and a Gemma-style turn template that
/// print their BOS): the tokens are
/// transformers' for the whole conversation, the prompt part (the loss mask) is the rendering
/// with the generation prompt, and the BOS id is not doubled.
#[test]
fn chat_templates_render_and_mask_as_transformers() {
    for name in ["chatml", "headers", "turns"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/families/chat")
            .join(name);
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let records: Vec<serde_json::Value> = cases
            .iter()
            .map(|c| serde_json::json!({"prompt": c["prompt"], "response": c["response"]}))
            .collect();
        let (_ws, tf) = tokenize_records(&records, "pair", &dir, "template = \"chat\"\n");
        assert_eq!(tf.docs(), cases.len());
        // The source keeps the records' order (a train split of everything).
        for (i, c) in cases.iter().enumerate() {
            let ids = |k: &str| -> Vec<u32> {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            };
            let (full, prompt) = (ids("full_ids"), ids("prompt_ids"));
            assert_eq!(tf.doc(i), full, "{name} case {i}: tokens");
            assert_eq!(
                tf.prompt_len(i) as usize,
                prompt.len(),
                "{name} case {i}: prompt"
            );
            assert_eq!(
                &full[..prompt.len()],
                &prompt[..],
                "{name} case {i}: the prompt is a prefix"
            );
        }
        let bos = tf.meta.bos_id;
        assert_eq!(
            bos.is_some(),
            name != "chatml",
            "{name}: BOS from tokenizer_config.json"
        );
    }
}

/// `tokenize` loads the kinds of tokenizer.json today's families ship and encodes as
/// `tokenizers` does in Python (fixtures by tests/fixtures/make_family_fixtures.py, built
/// from each family's components: Llama 3's split regex and byte-level BPE with
/// `ignore_merges`, Qwen2's NFC and regex, Gemma's U+2581 spaces and byte fallback):
/// every text's tokens are Python's between the BOS tokenizer_config.json names (none for
/// Qwen) and the EOS.
#[test]
fn family_tokenizers_encode_as_python_tokenizers() {
    for (name, bos, eos) in [
        ("llama3", Some("<|begin_of_text|>"), "<|end_of_text|>"),
        ("qwen2", None, "<|endoftext|>"),
        ("gemma", Some("<bos>"), "<eos>"),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/families/tokenizers")
            .join(name);
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let vocab: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let id_of = |token: &str| -> u32 {
            vocab["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["content"] == token)
                .map(|t| t["id"].as_u64().unwrap() as u32)
                .unwrap_or_else(|| panic!("{name}: {token}"))
        };
        let records: Vec<serde_json::Value> = cases
            .iter()
            .map(|c| serde_json::json!({"text": c["text"]}))
            .collect();
        let (_ws, tf) = tokenize_records(&records, "text", &dir, "");
        assert_eq!(tf.meta.bos_id, bos.map(id_of), "{name}: BOS");
        assert_eq!(tf.meta.eos_id, id_of(eos), "{name}: EOS");
        assert_eq!(tf.docs(), cases.len());
        for (i, c) in cases.iter().enumerate() {
            let mut want: Vec<u32> = tf.meta.bos_id.into_iter().collect();
            want.extend(
                c["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32),
            );
            want.push(tf.meta.eos_id);
            assert_eq!(tf.doc(i), want, "{name}: {}", c["text"]);
        }
    }
}
