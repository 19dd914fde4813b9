//! GSM8K as lm-evaluation-harness's `gsm8k` task scores it: k-shot "Question: ...\nAnswer:"
//! prompts, greedy generation until "Question:", and two answer filters (`strict-match` on
//! `#### N`, `flexible-extract` of the last number) compared by `exact_match` with lm-eval's
//! `regexes_to_ignore` and `ignore_case`.

use std::sync::LazyLock;

use regex::Regex;

/// What generation stops at (lm-eval's `until`; EOS is always a stop).
pub const STOP: &[&str] = &["Question:", "</s>", "<|im_end|>"];

/// What a filter returns when nothing matches (never equal to a normalized gold answer).
pub const INVALID: &str = "[invalid]";

static STRICT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"#### (\-?[0-9\.\,]+)").expect("valid regex"));
static FLEXIBLE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").expect("valid regex"));
static IGNORE: LazyLock<[Regex; 4]> = LazyLock::new(|| {
    [",", r"\$", r"(?s).*#### ", r"\.$"].map(|r| Regex::new(r).expect("valid regex"))
});

/// One k-shot prompt: `Question: {q}\nAnswer: {a}` blocks joined by a blank line, then the
/// question to answer.
pub fn prompt(shots: &[(&str, &str)], question: &str) -> String {
    let mut p = String::new();
    for (q, a) in shots {
        p.push_str(&format!("Question: {q}\nAnswer: {a}\n\n"));
    }
    p.push_str(&format!("Question: {question}\nAnswer:"));
    p
}

/// `strict-match`: the first `#### N` (lm-eval's regex filter, group 1, take_first).
pub fn strict_match(completion: &str) -> String {
    STRICT
        .captures(completion)
        .and_then(|c| c.get(1))
        .map_or(INVALID.to_string(), |m| m.as_str().to_string())
}

/// `flexible-extract`: the last number-like match (`group_select: -1`); a match is the first
/// non-empty alternative, as lm-eval picks from `re.findall`'s tuples.
pub fn flexible_extract(completion: &str) -> String {
    FLEXIBLE
        .captures_iter(completion)
        .last()
        .and_then(|c| c.get(1).or_else(|| c.get(2)))
        .map_or(INVALID.to_string(), |m| m.as_str().to_string())
}

/// `exact_match` normalization: every ignored regex removed in order, then lowercase.
pub fn normalize(s: &str) -> String {
    let mut t = s.to_string();
    for r in IGNORE.iter() {
        t = r.replace_all(&t, "").into_owned();
    }
    t.to_lowercase()
}

/// Whether an extracted answer equals the reference answer (a full GSM8K solution).
pub fn is_correct(extracted: &str, reference: &str) -> bool {
    normalize(extracted) == normalize(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_normalization_follow_lm_eval() {
        assert_eq!(strict_match(" so 3+4=7\n#### 1,234.\nQuestion"), "1,234.");
        assert!(is_correct("1,234.", "blah <<a=b>>\n#### 1234"));
        assert_eq!(strict_match("the answer is 7"), INVALID);
        assert!(!is_correct(INVALID, "#### 7"));
        assert_eq!(flexible_extract("I had $12 and 3 more, so 15."), "15.");
        assert!(is_correct(
            &flexible_extract("I had $12 and 3 more, so 15."),
            "#### 15"
        ));
        assert_eq!(flexible_extract("x = -4"), "-4");
        assert_eq!(flexible_extract("total $1,000"), "$1,000");
        assert!(is_correct("$1,000", "#### 1000"));
        assert_eq!(flexible_extract("no digits"), INVALID);
        assert_eq!(
            prompt(&[("q1", "a1")], "q2"),
            "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer:"
        );
    }
}
