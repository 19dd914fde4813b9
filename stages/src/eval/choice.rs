//! Multiple choice (HellaSwag, ARC, WinoGrande shapes) scored by log-likelihood, with the
//! three accuracies the literature uses on the same numbers:
//! - `acc` (lm-eval): the choice with the highest summed log-likelihood;
//! - `acc_norm` (lm-eval): highest log-likelihood divided by the choice's length in
//!   characters (the continuation without its leading target delimiter);
//! - `acc_ppl` (MosaicML's Gauntlet, which the paper used): lowest mean per-token loss.
//!
//! HellaSwag and ARC vary the continuation after one context; WinoGrande varies the context
//! before one continuation (lm-eval's partial evaluation).

use super::lm::Scored;

/// One multiple-choice item, as the `choice` record holds it.
#[derive(Debug, Clone)]
pub struct Item {
    pub style: String,
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    pub gold: usize,
}

impl Item {
    /// An item of one of the two shapes: one context and k continuations, or k contexts and
    /// one continuation, with `gold` < k. Anything else is refused with why (an empty side
    /// would panic in scoring; a `gold` out of range would score as a silent miss).
    pub fn new(
        style: String,
        contexts: Vec<String>,
        continuations: Vec<String>,
        gold: usize,
    ) -> Result<Item, String> {
        let (x, y) = (contexts.len(), continuations.len());
        if x == 0 || y == 0 {
            return Err(format!(
                "a `choice` record needs at least one context and one continuation, found {x} contexts and {y} continuations"
            ));
        }
        if x > 1 && y > 1 {
            return Err(format!(
                "a `choice` record has one context or one continuation, found {x} contexts and {y} continuations"
            ));
        }
        let item = Item {
            style,
            contexts,
            continuations,
            gold,
        };
        if gold >= item.choices() {
            return Err(format!(
                "`gold` is {gold}, but the `choice` record has {} choices",
                item.choices()
            ));
        }
        Ok(item)
    }

    /// How many choices the item has: the longer of its two sides.
    pub fn choices(&self) -> usize {
        self.contexts.len().max(self.continuations.len())
    }

    fn context(&self, i: usize) -> &str {
        &self.contexts[i.min(self.contexts.len() - 1)]
    }

    fn continuation(&self, i: usize) -> &str {
        &self.continuations[i.min(self.continuations.len() - 1)]
    }

    /// The solved example as a few-shot block: gold context and gold continuation.
    pub fn solved(&self) -> String {
        format!(
            "{}{}",
            self.context(self.gold),
            self.continuation(self.gold)
        )
    }

    /// (context, continuation) of every choice, after the few-shot blocks (joined by a blank
    /// line, lm-eval's `fewshot_delimiter`).
    pub fn requests(&self, shots: &[&Item]) -> Vec<(String, String)> {
        let prefix: String = shots.iter().map(|s| s.solved() + "\n\n").collect();
        (0..self.choices())
            .map(|i| {
                (
                    format!("{prefix}{}", self.context(i)),
                    self.continuation(i).to_string(),
                )
            })
            .collect()
    }
}

/// The three predictions of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Predictions {
    pub acc: usize,
    pub acc_norm: usize,
    pub acc_ppl: usize,
}

/// First index of the maximum (numpy's argmax, so ties go to the first choice).
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Predictions from the choices' scores (in choice order).
pub fn predict(item: &Item, scores: &[Scored]) -> Predictions {
    Predictions {
        acc: argmax(scores.iter().map(|s| s.ll)),
        acc_norm: argmax(scores.iter().enumerate().map(|(i, s)| {
            let text = item.continuation(i);
            let chars = text.strip_prefix(' ').unwrap_or(text).chars().count();
            s.ll / chars.max(1) as f64
        })),
        acc_ppl: argmax(scores.iter().map(|s| s.ll / s.tokens.max(1) as f64)),
    }
}

/// Running accuracies of one style.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub n: usize,
    pub acc: usize,
    pub acc_norm: usize,
    pub acc_ppl: usize,
}

impl Tally {
    pub fn add(&mut self, gold: usize, p: Predictions) {
        self.n += 1;
        self.acc += (p.acc == gold) as usize;
        self.acc_norm += (p.acc_norm == gold) as usize;
        self.acc_ppl += (p.acc_ppl == gold) as usize;
    }

    /// The named accuracy (`acc`, `acc_norm` or `acc_ppl`).
    pub fn get(&self, metric: &str) -> f64 {
        let hits = match metric {
            "acc_norm" => self.acc_norm,
            "acc_ppl" => self.acc_ppl,
            _ => self.acc,
        };
        hits as f64 / self.n.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ll: f64, tokens: usize) -> Scored {
        Scored {
            ll,
            greedy: false,
            tokens,
        }
    }

    #[test]
    fn the_three_accuracies_can_disagree_as_defined() {
        let item = Item {
            style: "hellaswag".into(),
            contexts: vec!["ctx".into()],
            continuations: vec![" ab".into(), " abcdefgh".into(), " abcd".into()],
            gold: 1,
        };
        // ll: -4 (2 chars, 1 token), -6 (8 chars, 4 tokens), -5 (4 chars, 1 token).
        let p = predict(&item, &[s(-4.0, 1), s(-6.0, 4), s(-5.0, 1)]);
        assert_eq!(p.acc, 0); // -4 is the largest sum
        assert_eq!(p.acc_norm, 1); // -6/8 = -0.75 beats -4/2 and -5/4
        assert_eq!(p.acc_ppl, 1); // -6/4 = -1.5 beats -4 and -5
        let mut t = Tally::default();
        t.add(item.gold, p);
        assert_eq!(
            (t.get("acc"), t.get("acc_norm"), t.get("acc_ppl")),
            (0.0, 1.0, 1.0)
        );
    }

    #[test]
    fn winogrande_varies_the_context_and_shots_prefix_it() {
        let shot = Item {
            style: "winogrande".into(),
            contexts: vec!["A so Bob".into(), "A so Ann".into()],
            continuations: vec![" left.".into()],
            gold: 1,
        };
        let item = Item {
            gold: 0,
            ..shot.clone()
        };
        let r = item.requests(&[&shot]);
        assert_eq!(
            r,
            vec![
                (
                    "A so Ann left.\n\nA so Bob".to_string(),
                    " left.".to_string()
                ),
                (
                    "A so Ann left.\n\nA so Ann".to_string(),
                    " left.".to_string()
                ),
            ]
        );
        assert_eq!(argmax([1.0, 3.0, 3.0].into_iter()), 1);
    }
}
