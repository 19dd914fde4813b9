//! The `synthetic` kind: three small worlds generated from a seed, so that the whole study
//! runs without internet or GPU.
//!
//! Every item has an identity (the general world's fact, the math problem's text, the code
//! template with its constants). One tenth of identities, chosen by blake3 of the identity, is
//! held out: math and code eval items and the `heldout` corpus are drawn only from it,
//! training data (`cpt`, `ift`) never; the general world's eval items ask about trained facts.

pub mod code;
pub mod general;
pub mod math;

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::json;

use super::records::{Record, RecordWriter, write_summary};
use super::rng::{Rng, blake3_u64};
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "synthetic"`.
pub static KIND: Kind = Kind {
    name: "synthetic",
    version: 5,
    doc: "generates the general, math or code world: CPT corpus, IFT pairs, held-out eval items",
    params: &[
        Param {
            name: "domain",
            ty: ParamType::Choice(&["general", "math", "code"]),
            default: Default::Required,
            doc: "general: facts about people + HellaSwag/ARC/WinoGrande-shaped items on them; math: GSM8K-shaped; code: HumanEval-shaped",
        },
        Param {
            name: "docs",
            ty: ParamType::Int,
            default: Default::Value("2000"),
            doc: "documents in the `cpt` output",
        },
        Param {
            name: "pairs",
            ty: ParamType::Int,
            default: Default::Value("1000"),
            doc: "prompt/response pairs in the `ift` output",
        },
        Param {
            name: "eval",
            ty: ParamType::Int,
            default: Default::Value("200"),
            doc: "held-out eval items in the `eval` output (code: at most the distinct held-out functions)",
        },
        Param {
            name: "heldout",
            ty: ParamType::Int,
            default: Default::Value("200"),
            doc: "held-out documents in the `heldout` output (for perplexity)",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "generator seed",
        },
    ],
    outputs: &["cpt", "ift", "eval", "heldout"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    domain: String,
    docs: i64,
    pairs: i64,
    eval: i64,
    heldout: i64,
    seed: i64,
}

/// True for identities in the held-out tenth.
pub fn is_heldout(identity: &str) -> bool {
    blake3_u64(identity.as_bytes()).is_multiple_of(10)
}

/// Which identities an output draws from.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// The training nine tenths (and items without an identity).
    Training,
    /// The held-out tenth.
    Heldout,
    /// Any: for items that probe what training taught (the general world's knowledge).
    Any,
}

/// Draws `n` items from one side of the split (items without an identity, such as lists of
/// equations, belong to the training side). Eval sides are deduplicated by identity; stops
/// early (returning fewer) when the side runs out of new identities.
/// Items are written as they are drawn: a large corpus is never held in memory.
fn draw(
    rng: &mut Rng,
    n: usize,
    side: Side,
    unique: bool,
    out: &mut RecordWriter,
    mut generate: Generate,
) -> Result<(), StageError> {
    let mut seen = HashSet::new();
    let mut misses = 0;
    while out.len() < n && misses < 200 * n.max(10) {
        let (item, identity) = generate(rng);
        let held = identity.as_deref().is_some_and(is_heldout);
        let wrong_side = match side {
            Side::Training => held,
            Side::Heldout => !held,
            Side::Any => false,
        };
        if wrong_side || (unique && !seen.insert(identity)) {
            misses += 1;
            continue;
        }
        out.write(&item)?;
    }
    Ok(())
}

/// The four outputs of one world, written as generated.
struct World {
    cpt: RecordWriter,
    ift: RecordWriter,
    eval: RecordWriter,
    heldout: RecordWriter,
}

fn text(t: String) -> Record {
    Record::Text { text: t }
}

/// Generators of one world's four outputs; each returns an item and its identity.
type Generate<'a> = Box<dyn FnMut(&mut Rng) -> (Record, Option<String>) + 'a>;

/// Draws every output of a world from its own sub-stream: training outputs from the
/// training side of the split, `eval` (deduplicated) from `eval_side` and `heldout` from the
/// held-out side.
fn write_world(
    rng: &Rng,
    p: &Params,
    w: &mut World,
    eval_side: Side,
    [cpt, ift, eval, heldout]: [Generate; 4],
) -> Result<(), StageError> {
    draw(
        &mut rng.fork("cpt"),
        p.docs as usize,
        Side::Training,
        false,
        &mut w.cpt,
        cpt,
    )?;
    draw(
        &mut rng.fork("ift"),
        p.pairs as usize,
        Side::Training,
        false,
        &mut w.ift,
        ift,
    )?;
    draw(
        &mut rng.fork("eval"),
        p.eval as usize,
        eval_side,
        true,
        &mut w.eval,
        eval,
    )?;
    draw(
        &mut rng.fork("heldout"),
        p.heldout as usize,
        Side::Heldout,
        false,
        &mut w.heldout,
        heldout,
    )
}

/// The general world's eval items ask about the knowledge its corpus teaches, so they are
/// drawn from any side of the split (each item's text is still never a training document).
fn general_world(rng: &Rng, p: &Params, w: &mut World) -> Result<(), StageError> {
    let styles = ["hellaswag", "arc", "winogrande"];
    let mut style_rng = rng.fork("styles");
    let knowledge = general::Knowledge::new(&mut rng.fork("knowledge"));
    let k = &knowledge;
    let doc = move |r: &mut Rng| {
        let (d, id) = general::document(r, k);
        (text(d), Some(id))
    };
    write_world(
        rng,
        p,
        w,
        Side::Any,
        [
            Box::new(doc),
            Box::new(move |r| {
                let (pair, id) = general::pair(r, k);
                (pair, Some(id))
            }),
            Box::new(move |r| {
                let (item, id) = general::choice_item(r, k, styles[style_rng.below(3)]);
                (item, Some(id))
            }),
            Box::new(doc),
        ],
    )
}

/// A math problem as a record of the given shape, identified by its question.
fn math_item(r: &mut Rng, shape: fn(String, String) -> Record) -> (Record, Option<String>) {
    let q = math::problem(r);
    (shape(q.question.clone(), q.answer), Some(q.question))
}

fn math_world(rng: &Rng, p: &Params, w: &mut World) -> Result<(), StageError> {
    write_world(
        rng,
        p,
        w,
        Side::Heldout,
        [
            Box::new(|r| {
                let doc = math::document(r);
                // Lists of equations and facts have no identity: they are never held out.
                let identity = doc
                    .strip_prefix("Question: ")
                    .and_then(|d| d.split_once("\nAnswer:"))
                    .map(|(q, _)| q.to_string());
                (text(doc), identity)
            }),
            Box::new(|r| math_item(r, |prompt, response| Record::Pair { prompt, response })),
            Box::new(|r| math_item(r, |question, answer| Record::Gsm8k { question, answer })),
            Box::new(|r| {
                let (item, id) = math_item(r, |q, a| Record::Text {
                    text: format!("Question: {q}\nAnswer: {a}"),
                });
                (item, id)
            }),
        ],
    )
}

fn code_world(rng: &Rng, p: &Params, w: &mut World) -> Result<(), StageError> {
    let mut index = 0;
    let source = |r: &mut Rng| {
        let f = code::problem(r);
        (text(f.source()), Some(f.identity))
    };
    write_world(
        rng,
        p,
        w,
        Side::Heldout,
        [
            Box::new(source),
            Box::new(|r| {
                let f = code::problem(r);
                (f.pair(), Some(f.identity))
            }),
            Box::new(move |r| {
                let f = code::problem(r);
                index += 1;
                (f.item(index - 1), Some(f.identity))
            }),
            Box::new(source),
        ],
    )
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    for (name, v) in [
        ("docs", p.docs),
        ("pairs", p.pairs),
        ("eval", p.eval),
        ("heldout", p.heldout),
    ] {
        if v < 0 {
            return Err(StageError::Params(format!("{name} must be >= 0, got {v}")));
        }
    }
    let mut w = World {
        cpt: RecordWriter::create(ctx.output("cpt")?)?,
        ift: RecordWriter::create(ctx.output("ift")?)?,
        eval: RecordWriter::create(ctx.output("eval")?)?,
        heldout: RecordWriter::create(ctx.output("heldout")?)?,
    };
    let rng = Rng::new(p.seed as u64).fork(&p.domain);
    match p.domain.as_str() {
        "general" => general_world(&rng, &p, &mut w)?,
        "math" => math_world(&rng, &p, &mut w)?,
        _ => code_world(&rng, &p, &mut w)?,
    }
    let mut outcome = StageOutcome::default();
    for (name, writer) in [
        ("cpt", w.cpt),
        ("ift", w.ift),
        ("eval", w.eval),
        ("heldout", w.heldout),
    ] {
        let count = writer.len();
        let types = writer.finish()?;
        let split = if p.domain == "general" && name == "eval" {
            "any: the items ask about knowledge the corpus states"
        } else {
            "held out: identities with blake3 % 10 == 0"
        };
        write_summary(
            ctx.output(name)?,
            &json!({"domain": p.domain, "seed": p.seed, "records": count, "types": types,
                    "split": split}),
        )?;
        outcome.metrics.insert(name.into(), json!(count));
    }
    Ok(outcome)
}
