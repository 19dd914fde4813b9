//! Row formats: how one row of a public dataset becomes a [`Record`].
//!
//! The multiple-choice conversions follow EleutherAI's lm-evaluation-harness (HellaSwag's
//! `preprocess`, ARC's `Question: ...\nAnswer:` prompt, WinoGrande's partial evaluation: the
//! option is part of the context and the rest of the sentence is the fixed continuation).

use serde_json::Value;

use super::records::Record;

/// Names accepted by the `format` param of the `source` kind.
pub const FORMATS: &[&str] = &[
    "text",
    "pair",
    "gsm8k",
    "metamathqa",
    "magicoder",
    "humaneval",
    "hellaswag",
    "arc",
    "winogrande",
];

/// Field names a format reads, where the pipeline may change them.
#[derive(Debug, Clone)]
pub struct Fields {
    /// The text field for `text` rows in JSON (OpenWebMath `text`, StarCoder `content`).
    pub text: String,
    pub prompt: String,
    pub response: String,
}

/// Why a row could not be converted; the caller adds file and line.
#[derive(Debug)]
pub struct RowError {
    pub field: String,
    pub message: String,
}

fn missing(field: &str) -> RowError {
    RowError {
        field: field.into(),
        message: "missing".into(),
    }
}

fn get_str(row: &Value, field: &str) -> Result<String, RowError> {
    match row.get(field) {
        None | Some(Value::Null) => Err(missing(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(RowError {
            field: field.into(),
            message: format!("must be a string, found {}", json_type(other)),
        }),
    }
}

fn get_strings(row: &Value, field: &str) -> Result<Vec<String>, RowError> {
    match row.get(field) {
        None | Some(Value::Null) => Err(missing(field)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| RowError {
                    field: field.into(),
                    message: "must be a list of strings".into(),
                })
            })
            .collect(),
        Some(other) => Err(RowError {
            field: field.into(),
            message: format!("must be a list of strings, found {}", json_type(other)),
        }),
    }
}

/// An index that datasets store as a number or a numeric string.
fn get_index(row: &Value, field: &str) -> Result<usize, RowError> {
    let bad = || RowError {
        field: field.into(),
        message: "must be a non-negative integer (or a string of one)".into(),
    };
    match row.get(field) {
        None | Some(Value::Null) => Err(missing(field)),
        Some(Value::Number(n)) => n.as_u64().map(|v| v as usize).ok_or_else(bad),
        Some(Value::String(s)) => s.trim().parse().map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn check_gold(gold: usize, n: usize, field: &str) -> Result<usize, RowError> {
    if gold < n {
        Ok(gold)
    } else {
        Err(RowError {
            field: field.into(),
            message: format!("answer index {gold} is out of range for {n} choices"),
        })
    }
}

/// lm-eval's HellaSwag `preprocess`: WikiHow artifacts out, double spaces collapsed.
pub fn hellaswag_preprocess(text: &str) -> String {
    let mut t = text.trim().replace(" [title]", ". ");
    // re.sub("\\[.*?\\]", "", text)
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    t = out.replace("  ", " ");
    t
}

/// Converts one JSON row in the named format.
pub fn convert(format: &str, row: &Value, fields: &Fields) -> Result<Record, RowError> {
    if !row.is_object() {
        return Err(RowError {
            field: "(row)".into(),
            message: format!("must be a JSON object, found {}", json_type(row)),
        });
    }
    Ok(match format {
        "text" => Record::Text {
            text: get_str(row, &fields.text)?,
        },
        "pair" => Record::Pair {
            prompt: get_str(row, &fields.prompt)?,
            response: get_str(row, &fields.response)?,
        },
        "gsm8k" => Record::Gsm8k {
            question: get_str(row, "question")?,
            answer: get_str(row, "answer")?,
        },
        "metamathqa" => Record::Pair {
            prompt: get_str(row, "query")?,
            response: get_str(row, "response")?,
        },
        "magicoder" => Record::Pair {
            prompt: get_str(row, "instruction")?,
            response: get_str(row, "response")?,
        },
        "humaneval" => Record::Code {
            task_id: get_str(row, "task_id")?,
            prompt: get_str(row, "prompt")?,
            canonical_solution: get_str(row, "canonical_solution")?,
            test: get_str(row, "test")?,
            entry_point: get_str(row, "entry_point")?,
        },
        "hellaswag" => {
            let ctx = match (row.get("ctx_a"), row.get("ctx_b")) {
                (Some(Value::String(a)), Some(Value::String(b))) => {
                    let mut chars = b.chars();
                    let cap: String = chars
                        .next()
                        .map(|c| c.to_uppercase().chain(chars).collect())
                        .unwrap_or_default();
                    format!("{a} {cap}")
                }
                _ => get_str(row, "ctx")?,
            };
            let label = get_str(row, "activity_label")?;
            let endings = get_strings(row, "endings")?;
            let gold = check_gold(get_index(row, "label")?, endings.len(), "label")?;
            Record::Choice {
                style: "hellaswag".into(),
                contexts: vec![hellaswag_preprocess(&format!("{label}: {ctx}"))],
                continuations: endings
                    .iter()
                    .map(|e| format!(" {}", hellaswag_preprocess(e)))
                    .collect(),
                gold,
            }
        }
        "arc" => {
            if row.get("query").is_some() {
                // MosaicML Gauntlet: `query` already reads "Question: ...".
                let choices = get_strings(row, "choices")?;
                let gold = check_gold(get_index(row, "gold")?, choices.len(), "gold")?;
                Record::Choice {
                    style: "arc".into(),
                    contexts: vec![format!("{}\nAnswer:", get_str(row, "query")?)],
                    continuations: choices.iter().map(|c| format!(" {c}")).collect(),
                    gold,
                }
            } else {
                let question = get_str(row, "question")?;
                let choices = row.get("choices").cloned().unwrap_or(Value::Null);
                let texts = get_strings(&choices, "text").map_err(|e| RowError {
                    field: format!("choices.{}", e.field),
                    message: e.message,
                })?;
                let labels = get_strings(&choices, "label").map_err(|e| RowError {
                    field: format!("choices.{}", e.field),
                    message: e.message,
                })?;
                let key = get_str(row, "answerKey")?;
                let gold = labels
                    .iter()
                    .position(|l| *l == key)
                    .ok_or_else(|| RowError {
                        field: "answerKey".into(),
                        message: format!("`{key}` is not among the choice labels {labels:?}"),
                    })?;
                Record::Choice {
                    style: "arc".into(),
                    contexts: vec![format!("Question: {question}\nAnswer:")],
                    continuations: texts.iter().map(|c| format!(" {c}")).collect(),
                    gold,
                }
            }
        }
        "winogrande" => {
            if row.get("context_options").is_some() {
                let contexts = get_strings(row, "context_options")?;
                let gold = check_gold(get_index(row, "gold")?, contexts.len(), "gold")?;
                Record::Choice {
                    style: "winogrande".into(),
                    contexts,
                    continuations: vec![format!(" {}", get_str(row, "continuation")?)],
                    gold,
                }
            } else {
                let sentence = get_str(row, "sentence")?;
                let idx = sentence.find('_').ok_or_else(|| RowError {
                    field: "sentence".into(),
                    message: "has no `_` blank".into(),
                })?;
                let options = [get_str(row, "option1")?, get_str(row, "option2")?];
                let answer = get_index(row, "answer")?;
                if !(1..=2).contains(&answer) {
                    return Err(RowError {
                        field: "answer".into(),
                        message: format!("must be 1 or 2, found {answer}"),
                    });
                }
                Record::Choice {
                    style: "winogrande".into(),
                    contexts: options
                        .iter()
                        .map(|o| format!("{}{o}", &sentence[..idx]))
                        .collect(),
                    continuations: vec![format!(" {}", sentence[idx + 1..].trim())],
                    gold: answer - 1,
                }
            }
        }
        other => {
            return Err(RowError {
                field: "format".into(),
                message: format!("unknown format `{other}`"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> Fields {
        Fields {
            text: "text".into(),
            prompt: "prompt".into(),
            response: "response".into(),
        }
    }

    #[test]
    fn hellaswag_follows_lm_eval_preprocessing() {
        // lm-eval strips before removing tags, so a leading tag leaves its space (checked
        // against the Python original).
        assert_eq!(
            hellaswag_preprocess(" [header] How to dance [title] Step one.  Go [step] now "),
            " How to dance. Step one. Go now"
        );
        let r = convert(
            "hellaswag",
            &json!({"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "he", "endings": ["a", "b"], "label": "1"}),
            &fields(),
        )
        .unwrap();
        assert_eq!(
            r,
            Record::Choice {
                style: "hellaswag".into(),
                contexts: vec!["Roof: A man sits. He".into()],
                continuations: vec![" a".into(), " b".into()],
                gold: 1
            }
        );
    }

    #[test]
    fn winogrande_hf_rows_split_at_the_blank() {
        let r = convert(
            "winogrande",
            &json!({"sentence": "Sarah beat Maria so _ got the trophy.", "option1": "Sarah", "option2": "Maria", "answer": "1"}),
            &fields(),
        )
        .unwrap();
        let Record::Choice {
            contexts,
            continuations,
            gold,
            ..
        } = r
        else {
            panic!()
        };
        assert_eq!(
            contexts,
            ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
        );
        assert_eq!(continuations, [" got the trophy."]);
        assert_eq!(gold, 0);
    }

    #[test]
    fn arc_hf_rows_find_the_answer_key() {
        let r = convert(
            "arc",
            &json!({"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}),
            &fields(),
        )
        .unwrap();
        let Record::Choice {
            contexts,
            continuations,
            gold,
            ..
        } = r
        else {
            panic!()
        };
        assert_eq!(contexts, ["Question: Q?\nAnswer:"]);
        assert_eq!(continuations, [" x", " y"]);
        assert_eq!(gold, 1);
    }

    #[test]
    fn ift_and_cpt_formats_read_their_fields() {
        let r = convert(
            "metamathqa",
            &json!({"query": "q", "response": "r", "type": "x"}),
            &fields(),
        );
        assert_eq!(
            r.unwrap(),
            Record::Pair {
                prompt: "q".into(),
                response: "r".into()
            }
        );
        let r = convert(
            "magicoder",
            &json!({"instruction": "i", "response": "r"}),
            &fields(),
        );
        assert_eq!(
            r.unwrap(),
            Record::Pair {
                prompt: "i".into(),
                response: "r".into()
            }
        );
        let starcoder = Fields {
            text: "content".into(),
            ..fields()
        };
        let r = convert(
            "text",
            &json!({"content": "def f(): pass", "max_stars_repo_name": "x"}),
            &starcoder,
        );
        assert_eq!(
            r.unwrap(),
            Record::Text {
                text: "def f(): pass".into()
            }
        );
        assert_eq!(
            convert("text", &json!({"text": "t"}), &starcoder)
                .unwrap_err()
                .field,
            "content"
        );
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let e = convert("gsm8k", &json!({"question": "q"}), &fields()).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("answer", "missing")
        );
        let e = convert("gsm8k", &json!({"question": 3, "answer": "a"}), &fields()).unwrap_err();
        assert_eq!(e.field, "question");
        assert!(e.message.contains("must be a string"));
        let e = convert(
            "arc",
            &json!({"query": "q", "choices": ["a"], "gold": 4}),
            &fields(),
        )
        .unwrap_err();
        assert!(e.message.contains("out of range"));
    }
}
