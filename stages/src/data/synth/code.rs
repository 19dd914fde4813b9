//! The `code` world: small Python functions with docstrings, HumanEval-shaped (`prompt` =
//! signature and docstring, `canonical_solution` = body, `test` = `check(candidate)`), from
//! ten parametrized templates. Expected values in tests are computed here, and a test runs
//! every canonical solution through python3.

use super::super::records::Record;
use super::super::rng::Rng;

/// One problem; `name` is its entry point and its identity (held-out split key).
pub struct Problem {
    pub name: String,
    pub signature: String,
    pub doc: String,
    pub body: String,
    /// (call arguments in Python syntax, expected result in Python syntax)
    pub cases: Vec<(String, String)>,
}

impl Problem {
    fn prompt(&self) -> String {
        let (args, want) = &self.cases[0];
        format!(
            "def {}:\n    \"\"\"{}\n    >>> {}({args})\n    {want}\n    \"\"\"\n",
            self.signature, self.doc, self.name
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

    /// An instruction pair: a request in words, the function as the answer.
    pub fn pair(&self) -> Record {
        Record::Pair {
            prompt: format!(
                "Write a Python function `{}`. {}",
                self.signature
                    .split(" ->")
                    .next()
                    .unwrap_or(&self.signature),
                self.doc
            ),
            response: self.source(),
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
pub fn problem(rng: &mut Rng) -> Problem {
    // Constants range widely so that no name's body can be memorized: with k in 2..30 (290
    // functions, each seen ~40 times) models recalled the nearest trained function instead of
    // copying the constant from the prompt.
    let k = rng.range(2, 99);
    let list = |rng: &mut Rng| -> Vec<i64> {
        (0..rng.range(3, 6))
            .map(|_| rng.range(-5, 2 * k + 5))
            .collect()
    };
    match rng.below(10) {
        0 => Problem {
            name: format!("add_{k}"),
            signature: format!("add_{k}(x: int) -> int"),
            doc: format!("Return x plus {k}."),
            body: format!("    return x + {k}\n"),
            cases: [3, -4, 10]
                .iter()
                .map(|x| (x.to_string(), (x + k).to_string()))
                .collect(),
        },
        1 => Problem {
            name: format!("times_{k}"),
            signature: format!("times_{k}(x: int) -> int"),
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
                name: format!("count_{c}"),
                signature: format!("count_{c}(s: str) -> int"),
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
            name: format!("sum_above_{k}"),
            signature: format!("sum_above_{k}(xs: list) -> int"),
            doc: format!("Return the sum of the numbers in xs that are greater than {k}."),
            body: format!("    return sum(x for x in xs if x > {k})\n"),
            cases: (0..3)
                .map(|_| {
                    let xs = list(rng);
                    (
                        py_list(&xs),
                        xs.iter().filter(|x| **x > k).sum::<i64>().to_string(),
                    )
                })
                .collect(),
        },
        4 => Problem {
            name: format!("count_below_{k}"),
            signature: format!("count_below_{k}(xs: list) -> int"),
            doc: format!("Return how many numbers in xs are smaller than {k}."),
            body: format!("    return len([x for x in xs if x < {k}])\n"),
            cases: (0..3)
                .map(|_| {
                    let xs = list(rng);
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
                name: format!("repeat_{n}"),
                signature: format!("repeat_{n}(s: str) -> str"),
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
                name: format!("starts_with_{c}"),
                signature: format!("starts_with_{c}(s: str) -> bool"),
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
                name: format!("clamp_{k}_{hi}"),
                signature: format!("clamp_{k}_{hi}(x: int) -> int"),
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
                name: format!("multiples_of_{m}"),
                signature: format!("multiples_of_{m}(xs: list) -> list"),
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
            name: format!("max_plus_{k}"),
            signature: format!("max_plus_{k}(xs: list) -> int"),
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
