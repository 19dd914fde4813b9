//! flow's log-likelihoods, multiple-choice accuracies and greedy generations against
//! Hugging Face transformers on the same tiny model and tokenizer
//! (tests/fixtures/make_eval_fixtures.py), on the real HellaSwag, ARC and WinoGrande files.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flow_stages::data::formats::{Fields, convert};
use flow_stages::data::records::Record;
use flow_stages::eval::choice::{self, Item, Tally};
use flow_stages::eval::lm::{GenOptions, GenRequest, Lm};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rows(rel: &str, n: usize) -> Vec<Value> {
    let path = root().join("../shared/data").join(rel);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader: Box<dyn Read> = if rel.ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    BufReader::new(reader)
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

fn items() -> Vec<Item> {
    let fields = Fields {
        text: "text".into(),
        prompt: "prompt".into(),
        response: "response".into(),
    };
    let mut out = Vec::new();
    for (format, rel) in [
        ("hellaswag", "hellaswag/hellaswag_val.jsonl.gz"),
        ("arc", "arc/arc_challenge.jsonl"),
        ("winogrande", "winogrande/winogrande.jsonl"),
    ] {
        for row in rows(rel, 12) {
            match convert(format, &row, &fields).unwrap() {
                Record::Choice {
                    style,
                    contexts,
                    continuations,
                    gold,
                } => out.push(Item {
                    style,
                    contexts,
                    continuations,
                    gold,
                }),
                other => panic!("not a choice record: {other:?}"),
            }
        }
    }
    out
}

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/eval/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn lm() -> Lm {
    Lm::load(&root().join("tests/fixtures/eval/model"), 5, 2).unwrap()
}

#[test]
fn multiple_choice_matches_transformers_and_lm_eval_definitions() {
    let lm = lm();
    let want = expected();
    let items = items();
    let want_items = want["items"].as_array().unwrap();
    assert_eq!(items.len(), want_items.len());
    let mut pairs = Vec::new();
    let mut spans = Vec::new();
    for item in &items {
        let start = pairs.len();
        for (c, k) in item.requests(&[]) {
            pairs.push(lm.encode_pair(&c, &k).unwrap());
        }
        spans.push(start..pairs.len());
    }
    let scored = lm.loglikelihood(&pairs).unwrap();
    let mut tallies = std::collections::BTreeMap::<String, Tally>::new();
    let mut worst = 0.0f64;
    for ((item, span), w) in items.iter().zip(spans).zip(want_items) {
        assert_eq!(item.style, w["style"].as_str().unwrap());
        let s = &scored[span];
        for (i, got) in s.iter().enumerate() {
            let ll = w["loglikelihoods"][i].as_f64().unwrap();
            worst = worst.max((got.ll - ll).abs() / ll.abs().max(1.0));
            assert_eq!(got.tokens as u64, w["tokens"][i].as_u64().unwrap());
            assert_eq!(got.greedy, w["greedy"][i].as_bool().unwrap());
        }
        let pred = choice::predict(item, s);
        assert_eq!(pred.acc as u64, w["pred"]["acc"].as_u64().unwrap());
        assert_eq!(
            pred.acc_norm as u64,
            w["pred"]["acc_norm"].as_u64().unwrap()
        );
        assert_eq!(pred.acc_ppl as u64, w["pred"]["acc_ppl"].as_u64().unwrap());
        tallies
            .entry(item.style.clone())
            .or_default()
            .add(item.gold, pred);
    }
    assert!(worst < 1e-5, "log-likelihood relative error {worst}");
    for (style, t) in &tallies {
        for metric in ["acc", "acc_norm", "acc_ppl"] {
            let w = want["metrics"][style][metric].as_f64().unwrap();
            assert_eq!(t.get(metric), w, "{style} {metric}");
        }
    }
    // The fixture is chosen so the three accuracies disagree somewhere: the test can fail.
    let h = &tallies["hellaswag"];
    assert_ne!(h.get("acc"), h.get("acc_norm"));
}

#[test]
fn cached_greedy_generation_matches_transformers_generate() {
    let lm = lm();
    let want = expected();
    let gens = want["generations"].as_array().unwrap();
    let requests: Vec<GenRequest> = gens
        .iter()
        .map(|g| GenRequest {
            prompt: g["prompt"].as_str().unwrap().to_string(),
            seed: 0,
        })
        .collect();
    let opts = GenOptions {
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        stop: vec![],
    };
    // Batch of 2 slots for 3 prompts: the third starts while the others decode.
    let lm2 = Lm { batch: 2, ..lm };
    let got = lm2.generate(&requests, &opts, |_| {}).unwrap();
    for (g, w) in got.iter().zip(gens) {
        let ids: Vec<u32> = w["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .filter(|id| !lm2.eos.contains(id))
            .collect();
        assert_eq!(
            g.text,
            lm2.decode(&ids).unwrap(),
            "prompt {:?}",
            w["prompt"]
        );
        assert_eq!(g.tokens, ids.len());
    }
}
