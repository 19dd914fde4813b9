//! A model's own chat template (`chat_template` of its `tokenizer_config.json`, Jinja as
//! transformers' `apply_chat_template` renders it) laying out prompt/response records for
//! `tokenize`'s `template = "chat"`, with only the assistant's answer as the target.
//!
//! Rendered by minijinja (with minijinja-contrib's Python compatibility for the string and
//! dict methods the Hub's templates call, `.strip()`, `.startswith()`, `.items()` ...), the
//! maintained Rust implementation of the Jinja subset these templates use.

use minijinja::{Environment, Error, ErrorKind, context};
use serde_json::Value;

use crate::kind::StageError;

/// A parsed chat template and the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

/// One record laid out by the template: the prompt (what the model sees before it answers,
/// generation prompt included) and the answer (the rest of the rendered conversation, its
/// end-of-turn marker included), which alone is trained on.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub prompt: String,
    pub answer: String,
}

impl ChatTemplate {
    /// The template of a `tokenizer_config.json` (a string, or the list of named templates
    /// some models give, of which `default` is taken), rendering `bos_token` and `eos_token`
    /// as the tokenizer is used (`tokenize`'s resolved special tokens, so a param that
    /// overrides the config's BOS reaches the template too); errors name the file's field.
    pub fn from_config(
        config: &Value,
        file: &str,
        bos: Option<&str>,
        eos: &str,
    ) -> Result<ChatTemplate, StageError> {
        let source = match config.get("chat_template") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| {
                    StageError::Failed(format!(
                        "{file}: `chat_template` lists no `default` template"
                    ))
                })?,
            _ => {
                return Err(StageError::Failed(format!(
                    "{file}: no `chat_template`: `template = \"chat\"` needs the model's chat template"
                )));
            }
        };
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers' helpers: `raise_exception(msg)` fails the render.
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| StageError::Failed(format!("{file}: `chat_template`: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.to_string(),
        })
    }

    /// The BOS token text the template prints (empty when the tokenizer has none).
    pub fn bos(&self) -> &str {
        &self.bos
    }

    /// `apply_chat_template(messages, add_generation_prompt=...)`.
    fn render(&self, messages: Value, add_generation_prompt: bool) -> Result<String, StageError> {
        let t = self
            .env
            .get_template("chat")
            .expect("added at construction");
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| StageError::Failed(format!("rendering the chat template: {e}")))
    }

    /// One user turn and the assistant's answer. The prompt is the user turn rendered with
    /// the generation prompt; the answer is what the full conversation adds to it, so the
    /// two tokenized one after the other are the conversation.
    pub fn record(&self, prompt: &str, response: &str) -> Result<Rendered, StageError> {
        let user = serde_json::json!({"role": "user", "content": prompt});
        let answer = serde_json::json!({"role": "assistant", "content": response});
        let head = self.render(Value::Array(vec![user.clone()]), true)?;
        let full = self.render(Value::Array(vec![user, answer]), false)?;
        let Some(rest) = full.strip_prefix(&head) else {
            return Err(StageError::Failed(
                "the chat template renders the conversation with a different beginning than its \
                 prompt (with the generation prompt): the answer cannot be told apart for the loss mask"
                    .into(),
            ));
        };
        Ok(Rendered {
            answer: rest.to_string(),
            prompt: head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ChatML template (the shape Qwen's are), written for this test.
    fn chatml() -> Value {
        serde_json::json!({
            "eos_token": "<|im_end|>",
            "bos_token": null,
            "chat_template": "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
        })
    }

    #[test]
    fn the_answer_is_what_the_conversation_adds_to_the_prompt() {
        let t = ChatTemplate::from_config(&chatml(), "tokenizer_config.json", None, "<|im_end|>")
            .unwrap();
        let r = t.record("  What is 2+2? ", "4").unwrap();
        assert_eq!(
            r.prompt,
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(r.answer, "4<|im_end|>\n");
    }

    #[test]
    fn a_template_that_raises_or_is_missing_is_a_named_error() {
        let mut c = chatml();
        c["chat_template"] = Value::String("{{ raise_exception('only user turns') }}".into());
        let t = ChatTemplate::from_config(&c, "tokenizer_config.json", None, "<|im_end|>").unwrap();
        let e = t.record("a", "b").err().unwrap().to_string();
        assert!(e.contains("only user turns"), "{e}");
        let e = ChatTemplate::from_config(
            &serde_json::json!({}),
            "x/tokenizer_config.json",
            None,
            "</s>",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("x/tokenizer_config.json") && e.contains("chat_template"),
            "{e}"
        );
    }
}
