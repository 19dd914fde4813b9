//! The `tokenize` kind: trains a byte-level BPE tokenizer (HF `tokenizers`) or loads any
//! `tokenizer.json`, and encodes record artifacts into the token format of [`super::tokens`],
//! in parallel batches, never holding a corpus in memory.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::json;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::chat::ChatTemplate;
use super::records::{Record, read_records};
use super::tokens::{TokenMeta, TokenWriter};
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "tokenize"`.
pub static KIND: Kind = Kind {
    name: "tokenize",
    version: 3,
    doc: "trains a byte-level BPE (or loads a tokenizer.json) and encodes records into token files",
    params: &[
        Param {
            name: "vocab_size",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "train a byte-level BPE of this size on `train_data` (else load `tokenizer` or `tokenizer_file`)",
        },
        Param {
            name: "min_frequency",
            ty: ParamType::Int,
            default: Default::Value("2"),
            doc: "BPE training: least count of a merged pair",
        },
        Param {
            name: "split_digits",
            ty: ParamType::Bool,
            default: Default::Value("true"),
            doc: "BPE training: every digit its own token, as in Llama-2's tokenizer (numbers are then copied and computed digit by digit)",
        },
        Param {
            name: "train_data",
            ty: ParamType::Inputs,
            default: Default::Value("[]"),
            doc: "record artifacts to train the tokenizer on (default: `data`)",
        },
        Param {
            name: "tokenizer",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "an artifact holding tokenizer.json (another tokenize stage's `tokenizer` output, a model)",
        },
        Param {
            name: "tokenizer_file",
            ty: ParamType::Files,
            default: Default::Optional,
            doc: "a local tokenizer.json (Llama-2's works)",
        },
        Param {
            name: "data",
            ty: ParamType::Inputs,
            default: Default::Value("[]"),
            doc: "record artifacts to encode into the `tokens` output",
        },
        Param {
            name: "template",
            ty: ParamType::Choice(&["plain", "llama2", "qa", "none", "chat"]),
            default: Default::Value("\"plain\""),
            doc: "how prompt/response records are laid out (llama2: `[INST] prompt [/INST] response`; qa: `Question: prompt\\nAnswer: response`, the GSM8K eval prompt; chat: the loaded tokenizer's own `chat_template`, a user turn and the assistant's answer, the answer alone trained on)",
        },
        Param {
            name: "bos_token",
            ty: ParamType::Str,
            default: Default::Optional,
            doc: "begin-of-sequence token, prepended to every document (`\"\"`: none); default: a loaded tokenizer's `tokenizer_config.json` (none for Qwen), else `<s>`",
        },
        Param {
            name: "eos_token",
            ty: ParamType::Str,
            default: Default::Optional,
            doc: "end-of-sequence token, appended to every document; default: a loaded tokenizer's `tokenizer_config.json`, else `</s>`",
        },
        Param {
            name: "pad_token",
            ty: ParamType::Str,
            default: Default::Optional,
            doc: "padding token (falls back to the EOS id when the vocabulary has none, as for Llama-2); default: a loaded tokenizer's `tokenizer_config.json`, else `<pad>`",
        },
    ],
    outputs: &["tokens", "tokenizer"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vocab_size: Option<i64>,
    min_frequency: i64,
    split_digits: bool,
    tokenizer_file: Option<Vec<String>>,
    template: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
}

/// The special tokens a tokenizer is used with, as text.
struct Specials {
    bos: Option<String>,
    eos: String,
    pad: Option<String>,
}

impl Specials {
    /// The params' tokens, else those of the tokenizer's own `tokenizer_config.json` (a
    /// model's: Llama 3's `<|begin_of_text|>`, Qwen's missing BOS), else Llama 2's.
    fn resolve(p: &Params, config: Option<&serde_json::Value>) -> Result<Specials, StageError> {
        let given = |v: &Option<String>| v.as_ref().map(|t| (!t.is_empty()).then(|| t.clone()));
        let from_config = |field: &str| -> Option<Option<String>> {
            let v = config?.get(field)?;
            Some(match v {
                serde_json::Value::String(t) => Some(t.clone()),
                // An AddedToken written out: {"content": "<s>", ...}.
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            })
        };
        let pick = |param: &Option<String>, field: &str, fallback: &str| -> Option<String> {
            given(param)
                .or_else(|| from_config(field))
                .unwrap_or_else(|| Some(fallback.to_string()))
        };
        let eos = pick(&p.eos_token, "eos_token", "</s>").ok_or_else(|| {
            StageError::Params("`eos_token` is empty: every document needs an end".into())
        })?;
        Ok(Specials {
            bos: pick(&p.bos_token, "bos_token", "<s>"),
            eos,
            pad: pick(&p.pad_token, "pad_token", "<pad>"),
        })
    }
}

/// Chat markers added as special tokens when training, so IFT templates stay atomic.
const CHAT_MARKERS: &[&str] = &["[INST]", "[/INST]"];

/// Records per encode batch: enough to keep every core busy, small enough for memory.
const BATCH: usize = 4096;

fn input_dirs(ctx: &StageContext, name: &str) -> Vec<PathBuf> {
    ctx.inputs
        .get(name)
        .map(|slot| slot.artifacts.iter().map(|a| a.dir.clone()).collect())
        .unwrap_or_default()
}

/// The texts a record contributes to tokenizer training.
fn training_texts(record: &Record) -> Vec<String> {
    match record.as_training() {
        Some(("", r)) => vec![r.to_string()],
        Some((p, r)) => vec![p.to_string(), r.to_string()],
        None => Vec::new(),
    }
}

fn train(ctx: &StageContext, p: &Params, vocab: usize) -> Result<Tokenizer, StageError> {
    let mut dirs = input_dirs(ctx, "train_data");
    if dirs.is_empty() {
        dirs = input_dirs(ctx, "data");
    }
    if dirs.is_empty() {
        return Err(StageError::Params(
            "vocab_size needs records to train on: set `train_data` or `data`".into(),
        ));
    }
    let names = Specials::resolve(p, None)?;
    let mut specials: Vec<AddedToken> = [names.bos, Some(names.eos), names.pad]
        .into_iter()
        .flatten()
        .map(|t| AddedToken::from(t, true))
        .collect();
    specials.extend(CHAT_MARKERS.iter().map(|t| AddedToken::from(*t, true)));
    let alphabet = ByteLevel::alphabet().into_iter().collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(p.min_frequency.max(0) as u64)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::new(false, true, true);
    if p.split_digits {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Stream the records; the trainer only keeps word counts.
    let mut error = None;
    let texts = dirs
        .iter()
        .flat_map(|d| match read_records(d) {
            Ok(it) => Box::new(it) as Box<dyn Iterator<Item = _> + Send>,
            Err(e) => Box::new(std::iter::once(Err(e))),
        })
        .map_while(|r| match r {
            Ok((_, rec)) => Some(training_texts(&rec)),
            Err(e) => {
                error = Some(e);
                None
            }
        })
        .flatten();
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| StageError::Failed(format!("training the tokenizer: {e}")))?;
    if let Some(e) = error {
        return Err(e);
    }
    Ok(tokenizer)
}

/// A loaded tokenizer and the `tokenizer_config.json` beside its `tokenizer.json`, if any.
fn load(
    ctx: &StageContext,
    p: &Params,
) -> Result<(Tokenizer, Option<serde_json::Value>), StageError> {
    let path = if let Some(files) = &p.tokenizer_file {
        let [f] = files.as_slice() else {
            return Err(StageError::Params(
                "tokenizer_file must name one file".into(),
            ));
        };
        PathBuf::from(f)
    } else if let Some(slot) = ctx.inputs.get("tokenizer") {
        slot.artifacts[0].dir.join("tokenizer.json")
    } else {
        return Err(StageError::Params(
            "set one of vocab_size (train), tokenizer (an artifact) or tokenizer_file".into(),
        ));
    };
    let tokenizer = Tokenizer::from_file(&path)
        .map_err(|e| StageError::Failed(format!("loading {}: {e}", path.display())))?;
    let config_path = path.with_file_name(TOKENIZER_CONFIG);
    let config = if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| StageError::io(format!("reading {}", config_path.display()), e))?;
        Some(
            serde_json::from_str(&text)
                .map_err(|e| StageError::Failed(format!("{}: {e}", config_path.display())))?,
        )
    } else {
        None
    };
    // transformers 4.43+ saves the chat template beside the config, as a Jinja file.
    let jinja = path.with_file_name(CHAT_TEMPLATE_FILE);
    let config = if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .map_err(|e| StageError::io(format!("reading {}", jinja.display()), e))?;
        let mut config = config.unwrap_or_else(|| json!({}));
        match config.as_object_mut() {
            Some(o) => {
                o.insert("chat_template".into(), serde_json::Value::String(text));
            }
            None => {
                return Err(StageError::Failed(format!(
                    "{}: not a JSON object",
                    config_path.display()
                )));
            }
        }
        Some(config)
    } else {
        config
    };
    Ok((tokenizer, config))
}

/// The chat template file transformers writes beside `tokenizer_config.json`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A Hugging Face tokenizer's settings (special tokens, chat template), kept beside
/// `tokenizer.json` in the `tokenizer` output.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

fn special_id(tok: &Tokenizer, token: &str) -> Option<u32> {
    tok.token_to_id(token)
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    // tokenizers batches on rayon's global pool: size it to the stage's share of the cores
    // (the stage runs in its own process, so this is the first and only configuration).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.threads.max(1))
        .build_global();
    let sources = [
        p.vocab_size.is_some(),
        p.tokenizer_file.is_some(),
        ctx.inputs.contains_key("tokenizer"),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(StageError::Params(
            "set exactly one of vocab_size (train), tokenizer (an artifact) or tokenizer_file"
                .into(),
        ));
    }
    let (tokenizer, config) = match p.vocab_size {
        Some(v) if v >= 256 + 5 => (train(ctx, &p, v as usize)?, None),
        Some(v) => {
            return Err(StageError::Params(format!(
                "vocab_size must be at least 261 (256 bytes + 5 special tokens), got {v}"
            )));
        }
        None => load(ctx, &p)?,
    };
    let names = Specials::resolve(&p, config.as_ref())?;
    let bos =
        match &names.bos {
            None => None,
            Some(t) => Some(special_id(&tokenizer, t).ok_or_else(|| {
                StageError::Failed(format!("the tokenizer has no BOS token `{t}`"))
            })?),
        };
    let eos = special_id(&tokenizer, &names.eos).ok_or_else(|| {
        StageError::Failed(format!("the tokenizer has no EOS token `{}`", names.eos))
    })?;
    let pad = names
        .pad
        .as_deref()
        .and_then(|t| special_id(&tokenizer, t))
        .unwrap_or(eos);
    let vocab_size = tokenizer.get_vocab_size(true) as u32;

    let tok_dir = ctx.output("tokenizer")?;
    tokenizer
        .save(tok_dir.join("tokenizer.json"), false)
        .map_err(|e| StageError::Failed(format!("saving tokenizer.json: {e}")))?;
    if let Some(config) = &config {
        let text = serde_json::to_string_pretty(config).expect("json");
        std::fs::write(tok_dir.join(TOKENIZER_CONFIG), text)
            .map_err(|e| StageError::io(format!("writing {TOKENIZER_CONFIG}"), e))?;
    }
    let specials = json!({"bos_id": bos, "eos_id": eos, "pad_id": pad, "vocab_size": vocab_size,
                          "bos_token": names.bos, "eos_token": names.eos, "template": p.template});
    std::fs::write(tok_dir.join("special_tokens.json"), specials.to_string())
        .map_err(|e| StageError::io("writing special_tokens.json", e))?;

    let chat = match (p.template.as_str(), &config) {
        ("chat", Some(config)) => Some(ChatTemplate::from_config(
            config,
            TOKENIZER_CONFIG,
            names.bos.as_deref(),
            &names.eos,
        )?),
        ("chat", None) => {
            return Err(StageError::Params(
                "`template = \"chat\"` needs a model's tokenizer (its tokenizer_config.json holds the chat template)".into(),
            ));
        }
        _ => None,
    };
    let layout = match &chat {
        Some(c) => Layout::Chat(c),
        None => Layout::Builtin(&p.template),
    };
    let out = ctx.output("tokens")?;
    let mut writer = TokenWriter::create(out, vocab_size)?;
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    let dirs = input_dirs(ctx, "data");
    let mut done = 0u64;
    for dir in &dirs {
        for item in read_records(dir)? {
            let (line, record) = item?;
            if record.as_training().is_none() {
                return Err(StageError::Failed(format!(
                    "{}:{line}: a `{}` record cannot be tokenized for training (use text, pair, gsm8k or code records)",
                    dir.join(super::records::RECORDS_FILE).display(),
                    record.type_name()
                )));
            }
            batch.push(record);
            if batch.len() == BATCH {
                encode_batch(&tokenizer, &layout, &batch, bos, eos, &mut writer)?;
                done += batch.len() as u64;
                ctx.progress.set_position(done);
                batch.clear();
            }
        }
    }
    encode_batch(&tokenizer, &layout, &batch, bos, eos, &mut writer)?;
    let meta = writer.finish(TokenMeta {
        dtype: String::new(),
        vocab_size,
        docs: 0,
        tokens: 0,
        bos_id: bos,
        eos_id: eos,
        pad_id: pad,
        template: p.template.clone(),
    })?;
    let mut outcome = StageOutcome::default();
    outcome.metrics.insert("docs".into(), json!(meta.docs));
    outcome.metrics.insert("tokens".into(), json!(meta.tokens));
    outcome
        .metrics
        .insert("vocab_size".into(), json!(vocab_size));
    Ok(outcome)
}

/// The prompt as laid out by the template (empty for plain text).
pub fn format_prompt(template: &str, prompt: &str) -> String {
    if prompt.is_empty() {
        return String::new();
    }
    match template {
        "llama2" => format!("[INST] {} [/INST]", prompt.trim()),
        "qa" => format!("Question: {prompt}\nAnswer:"),
        "plain" => format!("### Instruction:\n{prompt}\n\n### Response:\n"),
        _ => prompt.to_string(),
    }
}

/// The response as laid out by the template.
pub fn format_response(template: &str, prompt: &str, response: &str) -> String {
    if (template == "llama2" || template == "qa") && !prompt.is_empty() {
        format!(" {}", response.trim())
    } else {
        response.to_string()
    }
}

/// How records become text: a built-in template by name, or the model's chat template.
enum Layout<'a> {
    Builtin(&'a str),
    Chat(&'a ChatTemplate),
}

/// One laid-out record: prompt and answer texts, and whether BOS and EOS ids go around them
/// (a chat template prints its own markers, BOS included when it names one).
struct LaidOut {
    prompt: String,
    answer: String,
    bos: bool,
    eos: bool,
}

impl Layout<'_> {
    fn lay_out(&self, prompt: &str, response: &str) -> Result<LaidOut, StageError> {
        match self {
            Layout::Chat(chat) if !prompt.is_empty() => {
                let r = chat.record(prompt, response)?;
                let bos = chat.bos().is_empty() || !r.prompt.starts_with(chat.bos());
                Ok(LaidOut {
                    prompt: r.prompt,
                    answer: r.answer,
                    bos,
                    eos: false,
                })
            }
            Layout::Chat(_) => Ok(LaidOut {
                prompt: String::new(),
                answer: response.to_string(),
                bos: true,
                eos: true,
            }),
            Layout::Builtin(t) => Ok(LaidOut {
                prompt: format_prompt(t, prompt),
                answer: format_response(t, prompt, response),
                bos: true,
                eos: true,
            }),
        }
    }
}

/// Encodes a batch on all threads: prompt and response separately, so the boundary (and so
/// the loss mask) is exact; then `[BOS] prompt response [EOS]`.
fn encode_batch(
    tok: &Tokenizer,
    layout: &Layout,
    batch: &[Record],
    bos: Option<u32>,
    eos: u32,
    writer: &mut TokenWriter,
) -> Result<(), StageError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut prompts = Vec::with_capacity(batch.len());
    let mut responses = Vec::with_capacity(batch.len());
    let mut ends = Vec::with_capacity(batch.len());
    for r in batch {
        let (prompt, response) = r.as_training().expect("checked by the caller");
        let laid = layout.lay_out(prompt, response)?;
        prompts.push(laid.prompt);
        responses.push(laid.answer);
        ends.push((laid.bos, laid.eos));
    }
    let enc = |texts: Vec<String>| {
        tok.encode_batch_fast(texts, false)
            .map_err(|e| StageError::Failed(format!("encoding: {e}")))
    };
    let has_prompts = prompts.iter().any(|p| !p.is_empty());
    let prompt_ids = if has_prompts {
        Some(enc(prompts)?)
    } else {
        None
    };
    let response_ids = enc(responses)?;
    let mut ids = Vec::new();
    for (i, r) in response_ids.iter().enumerate() {
        let (with_bos, with_eos) = ends[i];
        ids.clear();
        if with_bos {
            ids.extend(bos);
        }
        // Plain text has no prompt: every token, BOS aside, is a target.
        let prompt = prompt_ids.as_ref().map(|p| p[i].get_ids()).unwrap_or(&[]);
        ids.extend_from_slice(prompt);
        let prompt_len = if prompt.is_empty() {
            0
        } else {
            ids.len() as u32
        };
        ids.extend_from_slice(r.get_ids());
        if with_eos {
            ids.push(eos);
        }
        writer.push(&ids, prompt_len)?;
    }
    Ok(())
}
