//! The `code` world: small Python functions with docstrings, HumanEval-shaped (`prompt` =
//! signature and docstring, `canonical_solution` = body, `test` = `check(candidate)`), from
//! ten parametrized templates. Expected values in tests are computed here, and a test runs
//! every canonical solution through python3.

use super::super::records::Record;
use super::super::rng::Rng;

/// One problem: a template's function with its constants.
pub struct Problem {
    /// The entry point: the template's name, shared by every constant (see [`problem`]).
    pub name: String,
    /// The held-out split key: the template and its constants.
    pub identity: String,
    pub signature: String,
    pub doc: String,
    pub body: String,
    /// (call arguments in Python syntax, expected result in Python syntax)
    pub cases: Vec<(String, String)>,
}

impl Problem {
    /// Signature and docstring, without HumanEval's usual `>>>` example: the example's
    /// argument and result were the only other numbers in the prompt, and the 4-layer model
    /// wrote them in place of the constant (`x + 98` for "Return x plus 95." over
    /// `>>> add(3)` / `98`: in 47 of 256 wrong samples the constant written was one of the
    /// example's numbers). Measured on one base model: full finetuning on the CPT corpus
    /// passed 4.1% of the held-out problems with the example and 94.9% without it; on the
    /// IFT pairs (4 epochs) 9.8% and 34.2%.
    fn prompt(&self) -> String {
        format!(
            "def {}:\n    \"\"\"{}\n    \"\"\"\n",
            self.signature, self.doc
        )
    }

    fn test(&self) -> String {
        let mut t = String::from("\n\nMETADATA = {}\n\n\ndef check(candidate):\n");
        for (args, want) in &self.cases {
            t.push_str(&format!("    assert candidate({args}) == {want}\n"));
        }
        t
    }

    /// The HumanEval-shaped eval item.
    pub fn item(&self, index: usize) -> Record {
        Record::Code {
            task_id: format!("FlowSynth/{index}"),
            prompt: self.prompt(),
            canonical_solution: self.body.clone(),
            test: self.test(),
            entry_point: self.name.clone(),
        }
    }

    /// The function as a source file would hold it.
    pub fn source(&self) -> String {
        format!("{}{}", self.prompt(), self.body)
    }

    /// An instruction pair: the eval's prompt (signature and docstring, trimmed as the
    /// HumanEval harness trims it) as the request and the body as the answer, so that
    /// finetuning on pairs (with `template = "none"`) trains the very task HumanEval asks,
    /// as the math world's `qa` pairs train GSM8K's. An earlier version asked for the function
    /// in words under an instruction header; HumanEval never shows the header, and after 4
    /// epochs the model wrote `return x\n    return x` for "Return x plus 19." (held-out
    /// code loss 4.3 nats against 0.7 after CPT; 3.7% passed).
    pub fn pair(&self) -> Record {
        let prompt = self.prompt();
        let stub = prompt.trim_end();
        Record::Pair {
            prompt: stub.to_string(),
            response: format!("{}{}", &prompt[stub.len()..], self.body),
        }
    }
}

fn py_list(xs: &[i64]) -> String {
    format!(
        "[{}]",
        xs.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn py_str(s: &str) -> String {
    format!("'{s}'")
}

const WORDS: &[&str] = &[
    "banana", "apple", "rocket", "planet", "garden", "yellow", "kitten", "summer", "pepper",
    "little", "bottle", "mirror", "coffee", "butter", "letter",
];

/// One random problem.
///
/// The name is the template's, never the constant's (`add`, not `add_51`): with the constant
/// in the name, the 4-layer default model learnt each trained name's body by heart (train
/// loss 0.59 against 0.80 held out) and wrote a remembered constant for a held-out name
/// (pass@1 3% after 614k tokens). With one name for all constants, only reading the constant
/// off the docstring predicts the body, as in HumanEval. The identity (held-out key) is the
/// template and its constants, so every template holds out about a tenth of its constants.
pub fn problem(rng: &mut Rng) -> Problem {
    let k = rng.range(2, 99);
    let list = |rng: &mut Rng| -> Vec<i64> {
        (0..rng.range(3, 6))
            .map(|_| rng.range(-5, 2 * k + 5))
            .collect()
    };
    // A threshold's tests hold the values on both sides of it, so that only the stated
    // constant passes: with random lists alone, 17 of 19 passing samples of a finetuned model
    // had a constant a few off (`x > 68` for "greater than 72").
    let straddling = |rng: &mut Rng, below: i64| -> Vec<i64> {
        let mut xs = list(rng);
        for v in [below, below + 1] {
            let at = rng.below(xs.len() + 1);
            xs.insert(at, v);
        }
        xs
    };
    match rng.below(10) {
        0 => Problem {
            name: "add".into(),
            identity: format!("add {k}"),
            signature: "add(x: int) -> int".into(),
            doc: format!("Return x plus {k}."),
            body: format!("    return x + {k}\n"),
            cases: [3, -4, 10]
                .iter()
                .map(|x| (x.to_string(), (x + k).to_string()))
                .collect(),
        },
        1 => Problem {
            name: "multiply".into(),
            identity: format!("multiply {k}"),
            signature: "multiply(x: int) -> int".into(),
            doc: format!("Return x multiplied by {k}."),
            body: format!("    return x * {k}\n"),
            cases: [2, -3, 7]
                .iter()
                .map(|x| (x.to_string(), (x * k).to_string()))
                .collect(),
        },
        2 => {
            let c = (b'a' + rng.below(26) as u8) as char;
            Problem {
                name: "count_letter".into(),
                identity: format!("count_letter {c}"),
                signature: "count_letter(s: str) -> int".into(),
                doc: format!("Count how many times the letter '{c}' appears in s."),
                body: format!("    return s.count('{c}')\n"),
                cases: (0..3)
                    .map(|_| {
                        let w = rng.pick(WORDS);
                        (py_str(w), w.matches(c).count().to_string())
                    })
                    .chain([(py_str(&format!("{c}x{c}")), "2".to_string())])
                    .collect(),
            }
        }
        3 => Problem {
            name: "sum_above".into(),
            identity: format!("sum_above {k}"),
            signature: "sum_above(xs: list) -> int".into(),
            doc: format!("Return the sum of the numbers in xs that are greater than {k}."),
            body: format!("    return sum(x for x in xs if x > {k})\n"),
            cases: (0..3)
                .map(|_| {
                    let xs = straddling(rng, k);
                    (
                        py_list(&xs),
                        xs.iter().filter(|x| **x > k).sum::<i64>().to_string(),
                    )
                })
                .collect(),
        },
        4 => Problem {
            name: "count_below".into(),
            identity: format!("count_below {k}"),
            signature: "count_below(xs: list) -> int".into(),
            doc: format!("Return how many numbers in xs are smaller than {k}."),
            body: format!("    return len([x for x in xs if x < {k}])\n"),
            cases: (0..3)
                .map(|_| {
                    let xs = straddling(rng, k - 1);
                    (
                        py_list(&xs),
                        xs.iter().filter(|x| **x < k).count().to_string(),
                    )
                })
                .collect(),
        },
        5 => {
            let n = k % 5 + 2;
            Problem {
                name: "repeat".into(),
                identity: format!("repeat {n}"),
                signature: "repeat(s: str) -> str".into(),
                doc: format!("Return s repeated {n} times."),
                body: format!("    return s * {n}\n"),
                cases: (0..3)
                    .map(|_| {
                        let w = rng.pick(WORDS);
                        (py_str(w), py_str(&w.repeat(n as usize)))
                    })
                    .collect(),
            }
        }
        6 => {
            let c = (b'a' + rng.below(26) as u8) as char;
            Problem {
                name: "starts_with_letter".into(),
                identity: format!("starts_with_letter {c}"),
                signature: "starts_with_letter(s: str) -> bool".into(),
                doc: format!("Return True if s starts with the letter '{c}', else False."),
                body: format!("    return s.startswith('{c}')\n"),
                cases: (0..3)
                    .map(|_| {
                        let w = rng.pick(WORDS);
                        let want = if w.starts_with(c) { "True" } else { "False" };
                        (py_str(w), want.to_string())
                    })
                    .chain([(py_str(&format!("{c}end")), "True".to_string())])
                    .collect(),
            }
        }
        7 => {
            let hi = k + rng.range(5, 20);
            Problem {
                name: "clamp".into(),
                identity: format!("clamp {k}"),
                signature: "clamp(x: int) -> int".into(),
                doc: format!("Return x limited to the range from {k} to {hi}."),
                body: format!("    return max({k}, min({hi}, x))\n"),
                cases: [k - 3, k + 2, hi + 4]
                    .iter()
                    .map(|x| (x.to_string(), (*x).clamp(k, hi).to_string()))
                    .collect(),
            }
        }
        8 => {
            let m = k % 6 + 2;
            Problem {
                name: "multiples".into(),
                identity: format!("multiples {m}"),
                signature: "multiples(xs: list) -> list".into(),
                doc: format!("Return the numbers in xs that are divisible by {m}, in order."),
                body: format!("    return [x for x in xs if x % {m} == 0]\n"),
                cases: (0..3)
                    .map(|_| {
                        let xs: Vec<i64> = list(rng).into_iter().map(|x| x.abs()).collect();
                        let want: Vec<i64> = xs.iter().copied().filter(|x| x % m == 0).collect();
                        (py_list(&xs), py_list(&want))
                    })
                    .collect(),
            }
        }
        _ => Problem {
            name: "max_plus".into(),
            identity: format!("max_plus {k}"),
            signature: "max_plus(xs: list) -> int".into(),
            doc: format!("Return the largest number in xs plus {k}."),
            body: format!("    return max(xs) + {k}\n"),
            cases: (0..3)
                .map(|_| {
                    let xs = list(rng);
                    (
                        py_list(&xs),
                        (xs.iter().max().expect("non-empty") + k).to_string(),
                    )
                })
                .collect(),
        },
    }
}
