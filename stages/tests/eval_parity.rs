//! flow's log-likelihoods, multiple-choice accuracies and greedy generations against
//! Hugging Face transformers on the same tiny model and tokenizer
//! (tests/fixtures/make_eval_fixtures.py), on the real HellaSwag, ARC and WinoGrande files:
//! on the CPU engine, and on a wgpu device (lavapipe in CI) against the same references.

#[cfg(feature = "wgpu")]
mod wgpu;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flow_stages::data::formats::{Fields, convert};
use flow_stages::data::records::Record;
use flow_stages::eval::choice::{self, Item, Tally};
use flow_stages::eval::lm::{GenOptions, GenRequest, Lm, Scored};
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

/// What one engine's multiple-choice pass gave: every score, and the three accuracies.
type ChoiceRun = (Vec<Scored>, std::collections::BTreeMap<String, Tally>);

/// Scores every item and checks each log-likelihood (relative error below `tol`), token
/// count, greedy flag and prediction against transformers and lm-eval's definitions.
fn check_multiple_choice(lm: &Lm, tol: f64) -> ChoiceRun {
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
    assert!(worst < tol, "log-likelihood relative error {worst}");
    for (style, t) in &tallies {
        for metric in ["acc", "acc_norm", "acc_ppl"] {
            let w = want["metrics"][style][metric].as_f64().unwrap();
            assert_eq!(t.get(metric), w, "{style} {metric}");
        }
    }
    // The fixture is chosen so the three accuracies disagree somewhere: the test can fail.
    let h = &tallies["hellaswag"];
    assert_ne!(h.get("acc"), h.get("acc_norm"));
    (scored, tallies)
}

#[test]
fn multiple_choice_matches_transformers_and_lm_eval_definitions() {
    check_multiple_choice(&lm(), 1e-5);
}

/// Greedy generation with 2 slots for 3 prompts (the third starts while the others
/// decode), token for token against transformers' `generate`.
fn check_greedy_generation(lm: Lm) {
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

#[test]
fn cached_greedy_generation_matches_transformers_generate() {
    check_greedy_generation(lm());
}

/// Sampled completions of every generation prompt, each with its own seed, and how many
/// prompt tokens were fed (the copies of a prompt share its prefill when they can).
fn sampled(lm: &Lm, copies: usize) -> (Vec<String>, usize) {
    let want = expected();
    let requests: Vec<GenRequest> = want["generations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| {
            (0..copies).map(|i| GenRequest {
                prompt: g["prompt"].as_str().unwrap().to_string(),
                seed: 100 + i as u64,
            })
        })
        .collect();
    let opts = GenOptions {
        max_new_tokens: 16,
        temperature: 0.8,
        top_p: 0.95,
        stop: vec![],
    };
    let (got, prefilled) = lm.generate_counted(&requests, &opts, &mut |_| {}).unwrap();
    (got.into_iter().map(|g| g.text).collect(), prefilled)
}

/// Prompt tokens of every generation prompt, BOS included, each fed once.
fn prompt_tokens(lm: &Lm) -> usize {
    expected()["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| lm.encode(g["prompt"].as_str().unwrap()).unwrap().len() + lm.bos.iter().count())
        .sum()
}

#[test]
fn sampling_does_not_depend_on_the_batch() {
    let (one, fed_one) = sampled(&Lm { batch: 1, ..lm() }, 3);
    let (four, fed_four) = sampled(&Lm { batch: 4, ..lm() }, 3);
    assert_eq!(one, four);
    // One slot feeds every copy's prompt; four slots copy a prompt from a slot that fed it
    // while that slot is still generating.
    let unique = prompt_tokens(&lm());
    assert_eq!(fed_one, 3 * unique);
    assert!(
        fed_four >= unique && fed_four < 3 * unique,
        "{fed_four} of {unique}"
    );
    assert!(
        one.chunks(3).any(|c| c[0] != c[1] || c[1] != c[2]),
        "{one:?}"
    );
}

#[cfg(feature = "wgpu")]
mod on_wgpu {
    use flow_stages::eval::lm::Engine;
    use flow_stages::gpu::decode::DeviceWeights;
    use flow_stages::gpu::precision::Precision;

    use super::*;

    fn lm_on_device(batch: usize) -> Lm {
        lm_in(batch, Precision::F32)
    }

    fn lm_in(batch: usize, precision: Precision) -> Lm {
        let mut lm = Lm { batch, ..lm() };
        lm.engine = Engine::Device(DeviceWeights::upload(
            &lm.weights,
            &wgpu::burn_device(),
            precision,
        ));
        lm
    }

    /// Scoring in f16 (weights, matmuls and the KV cache in f16; norms, softmax and
    /// log-probabilities in f32) stays within f16's precision of the f32 CPU engine's
    /// log-likelihoods, and picks the same answers but where two choices are within that
    /// precision of each other. Measured on lavapipe: 2.5e-4 relative at worst.
    #[test]
    fn device_scoring_in_f16_stays_within_f16s_precision() {
        let items = items();
        let mut pairs = Vec::new();
        let cpu = lm();
        for item in &items {
            for (c, k) in item.requests(&[]) {
                pairs.push(cpu.encode_pair(&c, &k).unwrap());
            }
        }
        let want = cpu.loglikelihood(&pairs).unwrap();
        let got = lm_in(5, Precision::F16).loglikelihood(&pairs).unwrap();
        let mut worst = 0.0f64;
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g.ll - w.ll).abs() / w.ll.abs().max(1.0));
            assert_eq!(g.tokens, w.tokens);
        }
        eprintln!("f16 log-likelihoods: worst relative error {worst:e}");
        assert!(worst > 0.0, "f16 computes in f16, not f32");
        assert!(worst < 2e-3, "log-likelihood relative error {worst:e}");
        let mut at = 0;
        for item in &items {
            let n = item.requests(&[]).len();
            let (g, w) = (&got[at..at + n], &want[at..at + n]);
            at += n;
            let (pg, pw) = (choice::predict(item, g), choice::predict(item, w));
            if pg.acc != pw.acc {
                let mut lls: Vec<f64> = w.iter().map(|s| s.ll).collect();
                lls.sort_by(|a, b| b.total_cmp(a));
                assert!(
                    (lls[0] - lls[1]).abs() < 4.0 * worst * lls[0].abs().max(1.0),
                    "f16 changed a clear answer: {lls:?}"
                );
            }
        }
    }

    #[test]
    fn device_scoring_matches_transformers_and_the_cpu_engine() {
        // Batches of 5 sequences of different lengths: padding must change no score.
        let (dev, dev_tallies) = check_multiple_choice(&lm_on_device(5), 1e-4);
        let (cpu, cpu_tallies) = check_multiple_choice(&lm(), 1e-5);
        for (d, c) in dev.iter().zip(&cpu) {
            assert!((d.ll - c.ll).abs() < 1e-4, "{} vs {}", d.ll, c.ll);
            assert_eq!((d.greedy, d.tokens), (c.greedy, c.tokens));
        }
        for (style, t) in &cpu_tallies {
            for metric in ["acc", "acc_norm", "acc_ppl"] {
                assert_eq!(
                    dev_tallies[style].get(metric),
                    t.get(metric),
                    "{style} {metric}"
                );
            }
        }
    }

    #[test]
    fn device_greedy_generation_matches_transformers_generate() {
        check_greedy_generation(lm_on_device(5));
    }

    #[test]
    fn device_sampling_does_not_depend_on_the_batch() {
        // 3 prompts x 3 seeds: one slot at a time, and 4 slots refilled as they finish.
        let (one, fed_one) = sampled(&lm_on_device(1), 3);
        let (four, fed_four) = sampled(&lm_on_device(4), 3);
        assert_eq!(one, four);
        // The copies shared prefills on the device too.
        assert!(fed_four < fed_one, "{fed_four} of {fed_one}");
        // Different seeds give different completions somewhere: the test can fail.
        assert!(
            one.chunks(3).any(|c| c[0] != c[1] || c[1] != c[2]),
            "{one:?}"
        );
    }
}
