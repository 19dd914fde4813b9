//! The `eval` kind: learning (target-domain) and forgetting (general) metrics of one model,
//! with the definitions of lm-evaluation-harness and bigcode-evaluation-harness, so the
//! numbers mean what the paper's numbers mean.

pub mod choice;
pub mod gsm8k;
pub mod humaneval;
pub mod lm;
pub mod sandbox;

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use self::choice::{Item, Tally};
use self::lm::{GenOptions, GenRequest, Lm};
use self::sandbox::{Level, Limits, Outcome, Sandbox};
use crate::cpu::llama::Llama;
use crate::cpu::ops::Rope;
use crate::data::pack::Packed;
use crate::data::records::{Record, read_records};
use crate::data::rng::Rng;
use crate::gpu::precision::Precision;
use crate::kind::{
    Default, InputArtifact, Kind, Param, ParamType, StageContext, StageError, StageOutcome,
};
use crate::train::data::{Attention, batch};

/// The tasks a stage can run.
pub const TASKS: &[&str] = &[
    "perplexity",
    "gsm8k",
    "humaneval",
    "multiple_choice",
    "forgetting",
];

/// The three styles whose mean accuracy is the forgetting score.
pub const FORGETTING_STYLES: [&str; 3] = ["hellaswag", "arc", "winogrande"];

/// Registered as `kind = "eval"`.
pub static KIND: Kind = Kind {
    name: "eval",
    version: 4,
    doc: "evaluates a model: perplexity, GSM8K, HumanEval (sandboxed), multiple choice, forgetting",
    params: &[
        Param {
            name: "model",
            ty: ParamType::Input,
            default: Default::Required,
            doc: "the model to evaluate (a `model` or training stage)",
        },
        Param {
            name: "tasks",
            ty: ParamType::List(&ParamType::Choice(TASKS)),
            default: Default::Required,
            doc: "what to run: perplexity, gsm8k, humaneval, multiple_choice, forgetting (= multiple_choice + the mean of the three accuracies)",
        },
        Param {
            name: "perplexity",
            ty: ParamType::Inputs,
            default: Default::Optional,
            doc: "perplexity: `pack` stages' rows (one result per input)",
        },
        Param {
            name: "attention",
            ty: ParamType::Choice(&["causal", "document"]),
            default: Default::Value("\"causal\""),
            doc: "perplexity: attention over packed rows, as in training",
        },
        Param {
            name: "gsm8k",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "gsm8k: records of questions and worked answers ending in `#### N`",
        },
        Param {
            name: "gsm8k_fewshot",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "gsm8k: records to draw the k shots from [default: the other eval items]",
        },
        Param {
            name: "gsm8k_shots",
            ty: ParamType::Int,
            default: Default::Value("5"),
            doc: "gsm8k: solved examples before each question",
        },
        Param {
            name: "humaneval",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "humaneval: `code` records (prompt, test, entry_point)",
        },
        Param {
            name: "samples",
            ty: ParamType::Int,
            default: Default::Value("1"),
            doc: "humaneval: completions per problem (n)",
        },
        Param {
            name: "temperature",
            ty: ParamType::Float,
            default: Default::Value("0.2"),
            doc: "humaneval: sampling temperature (0 = greedy)",
        },
        Param {
            name: "top_p",
            ty: ParamType::Float,
            default: Default::Value("0.95"),
            doc: "humaneval: nucleus mass",
        },
        Param {
            name: "pass_k",
            ty: ParamType::List(&ParamType::Int),
            default: Default::Value("[1, 5, 10, 25, 50, 100, 256]"),
            doc: "humaneval: the k of pass@k (those <= samples are reported)",
        },
        Param {
            name: "timeout",
            ty: ParamType::Float,
            default: Default::Value("3.0"),
            doc: "humaneval: seconds per program (at most a day)",
        },
        Param {
            name: "memory_mb",
            ty: ParamType::Int,
            default: Default::Value("1024"),
            doc: "humaneval: address-space limit per program",
        },
        Param {
            name: "site_packages",
            ty: ParamType::Bool,
            default: Default::Value("false"),
            doc: "humaneval: let programs import installed packages (Python's site); off, the standard library only",
        },
        Param {
            name: "sandbox",
            ty: ParamType::Choice(Level::NAMES),
            default: Default::Value("\"strict\""),
            doc: "humaneval: strict (user, network and PID namespaces and Landlock limiting reads and writes, or the stage fails) or rlimits (the namespaces the kernel allows and Landlock limiting writes only, where it can, besides the rlimits)",
        },
        Param {
            name: "choice",
            ty: ParamType::Inputs,
            default: Default::Optional,
            doc: "multiple_choice: records of `choice` items (HellaSwag, ARC, WinoGrande shapes; grouped by style)",
        },
        Param {
            name: "choice_shots",
            ty: ParamType::Int,
            default: Default::Value("0"),
            doc: "multiple_choice: solved examples (of the same style) before each item",
        },
        Param {
            name: "forgetting_metric",
            ty: ParamType::Choice(&["acc", "acc_norm", "acc_ppl"]),
            default: Default::Value("\"acc\""),
            doc: "forgetting: which accuracy the mean is over",
        },
        Param {
            name: "max_new_tokens",
            ty: ParamType::Int,
            default: Default::Value("256"),
            doc: "gsm8k and humaneval: generation budget",
        },
        Param {
            name: "limit",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "at most this many items per task (lm-eval's --limit)",
        },
        Param {
            name: "batch",
            ty: ParamType::Int,
            default: Default::Value("16"),
            doc: "sequences scored or generated at once",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "few-shot draws and sampling",
        },
        crate::gpu::precision::PARAM,
    ],
    outputs: &["results"],
    uses_device: true,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    tasks: Vec<String>,
    attention: String,
    gsm8k_shots: i64,
    samples: i64,
    #[serde(deserialize_with = "number")]
    temperature: f64,
    #[serde(deserialize_with = "number")]
    top_p: f64,
    pass_k: Vec<i64>,
    #[serde(deserialize_with = "number")]
    timeout: f64,
    memory_mb: i64,
    site_packages: bool,
    sandbox: String,
    choice_shots: i64,
    forgetting_metric: String,
    max_new_tokens: i64,
    limit: Option<i64>,
    batch: i64,
    seed: i64,
    precision: String,
}

fn bad(msg: impl Into<String>) -> StageError {
    StageError::Params(msg.into())
}

/// A float param. The engine passes a non-finite TOML float (`inf`, `nan`) as null, which
/// becomes NaN here, so that [`Params::check`] names the param instead of serde failing
/// with a message that names none.
fn number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The longest `timeout` accepted: a day (anything longer is a typo, and a timeout of 1e300
/// seconds is no `Duration`).
const MAX_TIMEOUT_S: f64 = 86_400.0;

impl Params {
    /// Checks what the schema cannot (ranges, finiteness), naming the param; returns the
    /// sandbox level.
    fn check(&self) -> Result<Level, StageError> {
        if self.tasks.is_empty() {
            return Err(bad("`tasks` is empty"));
        }
        if self.batch < 1 || self.samples < 1 || self.max_new_tokens < 1 {
            return Err(bad("batch, samples and max_new_tokens must be positive"));
        }
        if self.gsm8k_shots < 0 || self.choice_shots < 0 || self.limit.is_some_and(|l| l < 1) {
            return Err(bad("gsm8k_shots and choice_shots must be >= 0, limit >= 1"));
        }
        let number = |v: f64| {
            if v.is_finite() {
                format!("{v}")
            } else {
                "a non-finite number (inf or nan)".into()
            }
        };
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(format!(
                "`top_p` must be in (0, 1], found {}",
                number(self.top_p)
            )));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad(format!(
                "`temperature` must be a finite number >= 0, found {}",
                number(self.temperature)
            )));
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= MAX_TIMEOUT_S) {
            return Err(bad(format!(
                "`timeout` must be a number of seconds in (0, {MAX_TIMEOUT_S}], found {}",
                number(self.timeout)
            )));
        }
        if !(1..=1 << 40).contains(&self.memory_mb) {
            return Err(bad(format!(
                "`memory_mb` must be in [1, 2^40], found {}",
                self.memory_mb
            )));
        }
        Level::parse(&self.sandbox).ok_or_else(|| {
            bad(format!(
                "`sandbox` must be one of {}, found `{}`",
                Level::NAMES.join(", "),
                self.sandbox
            ))
        })
    }

    /// The sandbox's resource limits.
    fn limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_secs_f64(self.timeout),
            memory_bytes: (self.memory_mb.max(64) as u64) << 20,
            site_packages: self.site_packages,
            ..Limits::default()
        }
    }
}

/// The stage's `samples.jsonl`, one JSON object per scored item.
struct Samples(BufWriter<std::fs::File>, std::path::PathBuf);

impl Samples {
    fn write(&mut self, v: Value) -> Result<(), StageError> {
        writeln!(self.0, "{v}")
            .map_err(|e| StageError::io(format!("writing {}", self.1.display()), e))
    }
}

fn one<'a>(ctx: &'a StageContext, name: &str, task: &str) -> Result<&'a InputArtifact, StageError> {
    ctx.artifact(name)
        .ok_or_else(|| bad(format!("task `{task}` needs the `{name}` input")))
}

/// Reads every record of an artifact through `pick`, which returns None for a record of the
/// wrong type and an error for one it cannot use; errors carry file and line.
fn read<T>(
    dir: &Path,
    limit: Option<usize>,
    what: &str,
    pick: impl Fn(Record) -> Option<Result<T, String>>,
) -> Result<Vec<T>, StageError> {
    let mut out = Vec::new();
    let path = dir.join(crate::data::records::RECORDS_FILE);
    for r in read_records(dir)? {
        let (line, record) = r?;
        let found = record.type_name();
        match pick(record) {
            Some(Ok(t)) => out.push(t),
            Some(Err(why)) => {
                return Err(StageError::Failed(format!(
                    "{}:{line}: {why}",
                    path.display()
                )));
            }
            None => {
                return Err(StageError::Failed(format!(
                    "{}:{line}: {what} needs {what} records, found a `{found}` record",
                    path.display()
                )));
            }
        }
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(out)
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    crate::cpu::alloc::keep_freed_memory();
    let p: Params = ctx.typed_params()?;
    let level = p.check()?;
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.threads.max(1))
        .build_global();
    // The sandbox is probed before the model loads: a strict one that cannot be set up
    // fails the stage at once.
    let sandbox = if p.tasks.iter().any(|t| t == "humaneval") {
        Some(Sandbox::new(p.limits(), level)?)
    } else {
        None
    };
    let model = one(ctx, "model", "eval")?;
    let lm = load(&model.dir, &p, ctx)?;
    let out_dir = ctx.output("results")?;
    let samples_path = out_dir.join("samples.jsonl");
    let file = std::fs::File::create(&samples_path)
        .map_err(|e| StageError::io(format!("creating {}", samples_path.display()), e))?;
    let mut samples = Samples(BufWriter::new(file), samples_path);
    let limit = p.limit.map(|l| l as usize);
    let mut tasks = serde_json::Map::new();
    let mut data = serde_json::Map::new();
    let mut outcome = StageOutcome::default();
    let describe = |a: &[InputArtifact]| -> Value {
        a.iter()
            .map(|a| json!({"stage": a.stage, "digest": a.digest}))
            .collect()
    };
    let mut seen = std::collections::HashSet::new();
    for task in &p.tasks {
        // multiple_choice and forgetting share one scoring pass.
        let task = if task == "forgetting" {
            "multiple_choice"
        } else {
            task.as_str()
        };
        if !seen.insert(task) {
            continue;
        }
        let start = Instant::now();
        match task {
            "perplexity" => {
                let inputs = ctx.artifacts("perplexity");
                if inputs.is_empty() {
                    return Err(bad("task `perplexity` needs the `perplexity` input"));
                }
                let mut per = serde_json::Map::new();
                for a in inputs {
                    let r = perplexity(&lm, &a.dir, &p.attention, limit, ctx)?;
                    outcome
                        .metrics
                        .insert(format!("loss/{}", a.stage), json!(r["loss"]));
                    per.insert(a.stage.clone(), r);
                }
                tasks.insert("perplexity".into(), Value::Object(per));
                data.insert("perplexity".into(), describe(inputs));
            }
            "gsm8k" => {
                let a = one(ctx, "gsm8k", task)?;
                let fewshot = ctx.artifact("gsm8k_fewshot");
                let r = run_gsm8k(
                    &lm,
                    &p,
                    &a.dir,
                    fewshot.map(|f| f.dir.as_path()),
                    ctx,
                    &mut samples,
                )?;
                outcome
                    .metrics
                    .insert("gsm8k".into(), json!(r["strict_match"]));
                tasks.insert("gsm8k".into(), r);
                data.insert("gsm8k".into(), describe(std::slice::from_ref(a)));
            }
            "humaneval" => {
                let a = one(ctx, "humaneval", task)?;
                let sandbox = sandbox.as_ref().expect("probed for humaneval");
                let r = run_humaneval(&lm, &p, sandbox, &a.dir, ctx, &mut samples)?;
                outcome
                    .metrics
                    .insert("humaneval".into(), json!(r["pass@1"]));
                tasks.insert("humaneval".into(), r);
                data.insert("humaneval".into(), describe(std::slice::from_ref(a)));
            }
            _ => {
                let inputs = ctx.artifacts("choice");
                if inputs.is_empty() {
                    return Err(bad(format!("task `{task}` needs the `choice` input")));
                }
                let tallies = run_choice(&lm, &p, inputs, ctx, &mut samples)?;
                for (style, t) in &tallies {
                    tasks.insert(
                        style.clone(),
                        json!({"acc": t.get("acc"), "acc_norm": t.get("acc_norm"),
                               "acc_ppl": t.get("acc_ppl"), "n": t.n, "shots": p.choice_shots}),
                    );
                    outcome
                        .metrics
                        .insert(style.clone(), json!(t.get(&p.forgetting_metric)));
                }
                data.insert("multiple_choice".into(), describe(inputs));
                if p.tasks.iter().any(|t| t == "forgetting") {
                    let r = forgetting(&tallies, &p.forgetting_metric)?;
                    outcome
                        .metrics
                        .insert("forgetting".into(), r["score"].clone());
                    tasks.insert("forgetting".into(), r);
                }
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "{task}: {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    samples
        .0
        .flush()
        .map_err(|e| StageError::io("writing samples.jsonl", e))?;
    let metrics = json!({
        "tasks": tasks,
        "model": {"stage": model.stage, "digest": model.digest},
        "data": data,
        "seed": p.seed,
    });
    let path = out_dir.join("metrics.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&metrics).expect("JSON") + "\n",
    )
    .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
    Ok(outcome)
}

/// Loads the model onto the stage's device (`device = ...`, `auto` by default) in its
/// `precision`, saying which in the log; a device without that precision, or too small for
/// the model, fails before the weights are read.
fn load(dir: &Path, p: &Params, ctx: &StageContext) -> Result<Lm, StageError> {
    let precision = Precision::parse(&p.precision)?;
    let choice = crate::gpu::device::select(ctx.device)?;
    precision.check(&choice)?;
    let _ = writeln!(
        std::io::stderr(),
        "eval device: {}, precision {}",
        choice.describe(),
        precision.name()
    );
    Lm::load_on(dir, p.batch as usize, ctx.threads, choice, precision)
}

/// Mean token loss over every target of the packed rows (lm-eval's word perplexity is for
/// raw text; this is the token-level figure training reports, on held-out rows).
fn perplexity(
    lm: &Lm,
    dir: &Path,
    attention: &str,
    limit: Option<usize>,
    ctx: &StageContext,
) -> Result<Value, StageError> {
    let packed = Packed::open(dir)?;
    let reader = packed.reader()?;
    let rows = limit.map_or(reader.rows, |l| l.min(reader.rows));
    let arch = &lm.weights.arch;
    if packed.summary.seq_len > arch.positions {
        return Err(StageError::Failed(format!(
            "{}: rows of {} tokens exceed the {} positions the model runs at ({})",
            dir.display(),
            packed.summary.seq_len,
            arch.positions,
            arch.positions_source()
        )));
    }
    let rope = Rope::new(&lm.weights.arch, packed.summary.seq_len);
    let llama = Llama {
        w: &lm.weights,
        lora: None,
        rope: &rope,
        threads: lm.threads,
    };
    let attention = if attention == "document" {
        Attention::Document
    } else {
        Attention::Causal
    };
    let (mut loss, mut tokens) = (0.0f64, 0usize);
    let mut start = 0;
    while start < rows {
        let end = (start + lm.batch).min(rows);
        let chunk: Vec<_> = (start..end)
            .map(|i| reader.row(i))
            .collect::<Result<_, _>>()?;
        let b = batch(&chunk, attention);
        loss += match &lm.engine {
            self::lm::Engine::Cpu => llama.forward(&b, None, false).loss_sum,
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            self::lm::Engine::Device(on) => on.loss_sum(&lm.weights, &b),
        };
        tokens += b.target_count();
        ctx.progress
            .set_message(&format!("perplexity {end}/{rows} rows"));
        start = end;
    }
    if tokens == 0 {
        return Err(StageError::Failed(format!(
            "{}: no target tokens to score",
            dir.display()
        )));
    }
    let mean = loss / tokens as f64;
    Ok(json!({"loss": mean, "perplexity": mean.exp(), "tokens": tokens, "rows": rows}))
}

fn qa(r: Record) -> Option<Result<(String, String), String>> {
    match r {
        Record::Gsm8k { question, answer } => Some(Ok((question, answer))),
        Record::Pair { prompt, response } => Some(Ok((prompt, response))),
        _ => None,
    }
}

fn run_gsm8k(
    lm: &Lm,
    p: &Params,
    dir: &Path,
    fewshot: Option<&Path>,
    ctx: &StageContext,
    samples: &mut Samples,
) -> Result<Value, StageError> {
    let limit = p.limit.map(|l| l as usize);
    let items = read(dir, limit, "gsm8k", qa)?;
    let pool = match fewshot {
        Some(d) => read(d, None, "gsm8k", qa)?,
        None => Vec::new(),
    };
    let shots = p.gsm8k_shots as usize;
    let rng = Rng::new(p.seed as u64).fork("gsm8k-shots");
    let prompts: Vec<GenRequest> = items
        .iter()
        .enumerate()
        .map(|(i, (q, _))| {
            // Shots come from the few-shot pool, or from the other eval items.
            let candidates: Vec<usize> = if fewshot.is_some() {
                (0..pool.len()).collect()
            } else {
                (0..items.len()).filter(|&j| j != i).collect()
            };
            let source = if fewshot.is_some() { &pool } else { &items };
            let mut r = rng.fork(&i.to_string());
            let mut c = candidates;
            r.shuffle(&mut c);
            let chosen: Vec<(&str, &str)> = c
                .iter()
                .take(shots)
                .map(|&j| (source[j].0.as_str(), source[j].1.as_str()))
                .collect();
            GenRequest {
                prompt: gsm8k::prompt(&chosen, q),
                seed: 0,
            }
        })
        .collect();
    let opts = GenOptions {
        max_new_tokens: p.max_new_tokens as usize,
        temperature: 0.0,
        top_p: 1.0,
        stop: gsm8k::STOP.iter().map(|s| s.to_string()).collect(),
    };
    let total = prompts.len();
    let mut finished = 0;
    let generated = lm.generate(&prompts, &opts, |_| {
        finished += 1;
        ctx.progress
            .set_message(&format!("gsm8k {finished}/{total}"));
    })?;
    let (mut strict, mut flexible) = (0usize, 0usize);
    for (i, g) in generated.iter().enumerate() {
        let reference = &items[i].1;
        let s = gsm8k::strict_match(&g.text);
        let f = gsm8k::flexible_extract(&g.text);
        let (sc, fc) = (
            gsm8k::is_correct(&s, reference),
            gsm8k::is_correct(&f, reference),
        );
        strict += sc as usize;
        flexible += fc as usize;
        samples.write(
            json!({"task": "gsm8k", "index": i, "prompt": prompts[i].prompt,
            "completion": g.text, "strict_match": s, "flexible_extract": f,
            "correct_strict": sc, "correct_flexible": fc,
            "reference": gsm8k::normalize(reference)}),
        )?;
    }
    let n = items.len().max(1) as f64;
    Ok(
        json!({"strict_match": strict as f64 / n, "flexible_extract": flexible as f64 / n,
              "n": items.len(), "shots": shots, "max_new_tokens": p.max_new_tokens,
              "fewshot_seed": p.seed}),
    )
}

/// A HumanEval problem.
struct Problem {
    task_id: String,
    prompt: String,
    test: String,
    entry_point: String,
}

fn run_humaneval(
    lm: &Lm,
    p: &Params,
    sandbox: &Sandbox,
    dir: &Path,
    ctx: &StageContext,
    samples: &mut Samples,
) -> Result<Value, StageError> {
    let limit = p.limit.map(|l| l as usize);
    let problems = read(dir, limit, "humaneval", |r| match r {
        Record::Code {
            task_id,
            prompt,
            test,
            entry_point,
            ..
        } => Some(Ok(Problem {
            task_id,
            // bigcode strips the prompt: a trailing newline left alone would be a token the
            // model never saw there (BPE merges it with the next line's indentation).
            prompt: prompt.trim().to_string(),
            test,
            entry_point,
        })),
        _ => None,
    })?;
    let n = p.samples as usize;
    let rng = Rng::new(p.seed as u64).fork("humaneval");
    let requests: Vec<GenRequest> = problems
        .iter()
        .flat_map(|pr| {
            let r = rng.fork(&pr.task_id);
            (0..n).map(move |j| GenRequest {
                prompt: pr.prompt.clone(),
                seed: r.fork(&j.to_string()).next_u64(),
            })
        })
        .collect();
    let opts = GenOptions {
        max_new_tokens: p.max_new_tokens as usize,
        temperature: p.temperature,
        top_p: p.top_p,
        stop: humaneval::STOP.iter().map(|s| s.to_string()).collect(),
    };
    let total = requests.len();
    let mut finished = 0;
    let started = std::time::Instant::now();
    let generated = lm.generate(&requests, &opts, |_| {
        finished += 1;
        ctx.progress
            .set_message(&format!("humaneval: generated {finished}/{total}"));
    })?;
    let completions: Vec<String> = generated
        .iter()
        .map(|g| humaneval::cut(&g.text).to_string())
        .collect();
    let generating = started.elapsed().as_secs_f64();
    let outcomes = execute(sandbox, &problems, &completions, n)?;
    let _ = writeln!(
        std::io::stderr(),
        "humaneval: {total} completions generated in {generating:.1} s, run in {:.1} s",
        started.elapsed().as_secs_f64() - generating
    );
    let mut per_problem = Vec::new();
    let mut passed_total = 0;
    let ks: Vec<usize> = p
        .pass_k
        .iter()
        .filter(|&&k| k >= 1 && k as usize <= n)
        .map(|&k| k as usize)
        .collect();
    let mut pass = vec![0.0f64; ks.len()];
    let (mut uniq, mut uniq_pass, mut uniq_fail) = (0usize, 0usize, 0usize);
    for (i, pr) in problems.iter().enumerate() {
        let range = i * n..(i + 1) * n;
        let c = outcomes[range.clone()]
            .iter()
            .filter(|o| **o == Outcome::Passed)
            .count();
        passed_total += c;
        for (slot, &k) in pass.iter_mut().zip(&ks) {
            *slot += humaneval::pass_at_k(n, c, k);
        }
        let pairs: Vec<(&str, bool)> = range
            .clone()
            .map(|j| (completions[j].as_str(), outcomes[j] == Outcome::Passed))
            .collect();
        let (u, up, uf) = humaneval::diversity(&pairs);
        uniq += u;
        uniq_pass += up;
        uniq_fail += uf;
        per_problem.push(c);
        for (j, idx) in range.enumerate() {
            let result = match &outcomes[idx] {
                Outcome::Passed => "passed".to_string(),
                Outcome::TimedOut => "timed out".to_string(),
                Outcome::Failed(m) => format!("failed: {m}"),
            };
            samples.write(
                json!({"task": "humaneval", "task_id": pr.task_id, "sample": j,
                "completion": completions[idx], "passed": outcomes[idx] == Outcome::Passed,
                "result": result}),
            )?;
        }
    }
    let count = problems.len().max(1) as f64;
    let mut r = serde_json::Map::new();
    for (k, v) in ks.iter().zip(&pass) {
        r.insert(format!("pass@{k}"), json!(v / count));
    }
    r.insert("n".into(), json!(problems.len()));
    r.insert("samples".into(), json!(n));
    r.insert("passed_samples".into(), json!(passed_total));
    r.insert("temperature".into(), json!(p.temperature));
    r.insert("top_p".into(), json!(p.top_p));
    r.insert("sampling_seed".into(), json!(p.seed));
    r.insert(
        "diversity".into(),
        json!({"unique_per_problem": uniq as f64 / count,
               "unique_passed_per_problem": uniq_pass as f64 / count,
               "unique_failed_per_problem": uniq_fail as f64 / count}),
    );
    r.insert("sandbox".into(), sandbox.describe());
    Ok(Value::Object(r))
}

/// Runs every (problem, sample) program in the sandbox on the stage's threads.
fn execute(
    sandbox: &Sandbox,
    problems: &[Problem],
    completions: &[String],
    n: usize,
) -> Result<Vec<Outcome>, StageError> {
    (0..completions.len())
        .into_par_iter()
        .map(|i| {
            let pr = &problems[i / n];
            let program =
                humaneval::program(&pr.prompt, &completions[i], &pr.test, &pr.entry_point);
            sandbox.run(&program).map(|e| e.outcome)
        })
        .collect()
}

fn run_choice(
    lm: &Lm,
    p: &Params,
    inputs: &[InputArtifact],
    ctx: &StageContext,
    samples: &mut Samples,
) -> Result<BTreeMap<String, Tally>, StageError> {
    let limit = p.limit.map(|l| l as usize);
    let mut items = Vec::new();
    for a in inputs {
        items.extend(choice_items(&a.dir, limit)?);
    }
    let shots = p.choice_shots as usize;
    let rng = Rng::new(p.seed as u64).fork("choice-shots");
    // Every (context, continuation) of every item, then one batched scoring pass.
    let mut pairs = Vec::new();
    let mut spans = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut c: Vec<usize> = (0..items.len())
            .filter(|&j| j != i && items[j].style == item.style)
            .collect();
        rng.fork(&i.to_string()).shuffle(&mut c);
        let chosen: Vec<&Item> = c.iter().take(shots).map(|&j| &items[j]).collect();
        let start = pairs.len();
        for (context, continuation) in item.requests(&chosen) {
            pairs.push(lm.encode_pair(&context, &continuation)?);
        }
        spans.push(start..pairs.len());
    }
    ctx.progress
        .set_message(&format!("multiple choice: {} continuations", pairs.len()));
    let scored = lm.loglikelihood(&pairs)?;
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for (i, (item, span)) in items.iter().zip(spans).enumerate() {
        let s = &scored[span];
        let pred = choice::predict(item, s);
        tallies
            .entry(item.style.clone())
            .or_default()
            .add(item.gold, pred);
        samples.write(json!({"task": item.style, "index": i, "gold": item.gold,
            "loglikelihoods": s.iter().map(|x| x.ll).collect::<Vec<_>>(),
            "tokens": s.iter().map(|x| x.tokens).collect::<Vec<_>>(),
            "pred_acc": pred.acc, "pred_acc_norm": pred.acc_norm, "pred_acc_ppl": pred.acc_ppl}))?;
    }
    Ok(tallies)
}

/// The multiple-choice items of one artifact; a record of the wrong shape is an error
/// naming its file and line.
fn choice_items(dir: &Path, limit: Option<usize>) -> Result<Vec<Item>, StageError> {
    read(dir, limit, "multiple_choice", |r| match r {
        Record::Choice {
            style,
            contexts,
            continuations,
            gold,
        } => Some(Item::new(style, contexts, continuations, gold)),
        _ => None,
    })
}

/// The paper's forgetting score: the plain mean of the three styles' accuracies.
fn forgetting(tallies: &BTreeMap<String, Tally>, metric: &str) -> Result<Value, StageError> {
    let mut parts = serde_json::Map::new();
    for style in FORGETTING_STYLES {
        let t = tallies.get(style).ok_or_else(|| {
            StageError::Failed(format!(
                "forgetting needs {} items, but the `choice` inputs have none of style `{style}`",
                FORGETTING_STYLES.join(", ")
            ))
        })?;
        parts.insert(style.into(), json!(t.get(metric)));
    }
    let score = parts.values().filter_map(Value::as_f64).sum::<f64>() / 3.0;
    Ok(json!({"score": score, "metric": metric, "parts": parts}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The params as the engine passes them with every default filled in, `edit` applied.
    fn params(edit: impl FnOnce(&mut Value)) -> Result<Params, StageError> {
        let mut v = json!({
            "tasks": ["humaneval"], "attention": "causal", "gsm8k_shots": 5, "samples": 1,
            "temperature": 0.2, "top_p": 0.95, "pass_k": [1], "timeout": 3.0,
            "memory_mb": 1024, "site_packages": false, "sandbox": "strict",
            "choice_shots": 0, "forgetting_metric": "acc", "max_new_tokens": 256,
            "batch": 16, "seed": 1, "precision": "f32",
        });
        edit(&mut v);
        serde_json::from_value::<Params>(v).map_err(|e| bad(e.to_string()))
    }

    fn error(p: Result<Params, StageError>) -> String {
        match p.and_then(|p| p.check()) {
            Err(e) => e.to_string(),
            Ok(level) => panic!("accepted (sandbox {level:?})"),
        }
    }

    /// Non-finite numbers are errors naming the param, not a panic in `Duration` or a
    /// sampler fed NaN: directly, and as the engine passes `inf`/`nan` (null).
    #[test]
    fn non_finite_and_out_of_range_numbers_are_errors_naming_the_param() {
        assert_eq!(params(|_| {}).unwrap().check().unwrap(), Level::Strict);
        for (field, value) in [
            ("timeout", f64::INFINITY),
            ("timeout", f64::NAN),
            ("timeout", 1e300),
            ("timeout", 0.0),
            ("temperature", f64::NAN),
            ("temperature", f64::INFINITY),
            ("temperature", -1.0),
            ("top_p", f64::NAN),
            ("top_p", 1.5),
        ] {
            let mut p = params(|_| {}).unwrap();
            match field {
                "timeout" => p.timeout = value,
                "temperature" => p.temperature = value,
                _ => p.top_p = value,
            }
            let why = error(Ok(p));
            assert!(
                why.contains(&format!("`{field}`")),
                "{field} = {value}: {why}"
            );
            // What the engine passes for `inf` or `nan`: null.
            let why = error(params(|v| v[field] = Value::Null));
            assert!(why.contains(&format!("`{field}`")), "{field} = null: {why}");
        }
    }

    #[test]
    fn the_sandbox_level_is_checked_and_named() {
        let p = params(|v| v["sandbox"] = json!("rlimits")).unwrap();
        assert_eq!(p.check().unwrap(), Level::Rlimits);
        let why = error(params(|v| v["sandbox"] = json!("none")));
        assert!(why.contains("`sandbox`") && why.contains("`none`"), "{why}");
        assert!(KIND.param("sandbox").is_some());
    }

    /// A `choice` record with an empty side, two sides of several entries or a `gold` out of
    /// range is an error naming the file and line (an empty side panicked in scoring; a
    /// `gold` out of range scored as a silent miss).
    #[test]
    fn malformed_choice_records_are_errors_naming_file_and_line() {
        let good = json!({"type": "choice", "style": "arc", "contexts": ["Q:"],
            "continuations": [" a", " b"], "gold": 1});
        for (bad, what) in [
            (json!({"contexts": []}), "contexts"),
            (json!({"continuations": []}), "continuations"),
            (json!({"gold": 2}), "`gold` is 2"),
            (
                json!({"contexts": ["x", "y"], "continuations": [" a", " b", " c"]}),
                "one context",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut record = good.clone();
            for (k, v) in bad.as_object().unwrap() {
                record[k] = v.clone();
            }
            let text = format!("{good}\n{record}\n");
            std::fs::write(dir.path().join(crate::data::records::RECORDS_FILE), text).unwrap();
            let why = match choice_items(dir.path(), None) {
                Err(e) => e.to_string(),
                Ok(items) => panic!("accepted {record}: {} items", items.len()),
            };
            assert!(why.contains("records.jsonl:2:"), "{why}");
            assert!(why.contains(what), "{record}: {why}");
        }
        // WinoGrande's shape (two contexts, one continuation) is fine.
        let dir = tempfile::tempdir().unwrap();
        let wino = json!({"type": "choice", "style": "winogrande", "contexts": ["A", "B"],
            "continuations": [" c"], "gold": 1});
        std::fs::write(
            dir.path().join(crate::data::records::RECORDS_FILE),
            format!("{wino}\n"),
        )
        .unwrap();
        assert_eq!(choice_items(dir.path(), None).unwrap()[0].choices(), 2);
    }
}
