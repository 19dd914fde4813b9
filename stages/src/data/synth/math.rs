//! The `math` world: GSM8K-shaped word problems (two steps of +, -, x) with step-by-step
//! solutions in GSM8K's `<<a+b=c>>` notation and a final `#### N`. Numbers stay small (sums
//! below 100, products of factors up to 6, or doubling and tripling) so that a tiny model can
//! learn their arithmetic from the corpus; with numbers up to 60 it learned the format and
//! not the sums.

use super::super::rng::Rng;

const NAMES: &[(&str, &str)] = &[
    ("Tom", "he"),
    ("Lucy", "she"),
    ("Omar", "he"),
    ("Nina", "she"),
    ("Raj", "he"),
    ("Ella", "she"),
    ("Marco", "he"),
    ("Sofia", "she"),
    ("Ivan", "he"),
    ("Hana", "she"),
];
const ITEMS: &[&str] = &[
    "apples", "pencils", "stickers", "marbles", "cookies", "cards", "books", "shells", "stamps",
    "oranges", "buttons", "candles",
];

/// A problem and its worked answer.
pub struct Problem {
    pub question: String,
    pub answer: String,
    pub result: i64,
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// One random problem from one of six templates.
pub fn problem(rng: &mut Rng) -> Problem {
    let (name, he) = *rng.pick(NAMES);
    let (other, _) = *rng.pick(
        &NAMES
            .iter()
            .copied()
            .filter(|(n, _)| *n != name)
            .collect::<Vec<_>>(),
    );
    let item = *rng.pick(ITEMS);
    let he_cap = cap(he);
    match rng.below(6) {
        0 => {
            let (a, b) = (rng.range(2, 15), rng.range(2, 10));
            let c = rng.range(1, a + b - 1);
            let (s1, s2) = (a + b, a + b - c);
            Problem {
                question: format!(
                    "{name} has {a} {item}. {he_cap} buys {b} more {item}. Then {he} gives {c} {item} to {other}. How many {item} does {name} have now?"
                ),
                answer: format!(
                    "{name} starts with {a} {item}.\nAfter buying more, {he} has {a}+{b}=<<{a}+{b}={s1}>>{s1} {item}.\nAfter giving {c} away, {he} has {s1}-{c}=<<{s1}-{c}={s2}>>{s2} {item}.\n#### {s2}"
                ),
                result: s2,
            }
        }
        1 => {
            let (a, b) = (rng.range(2, 6), rng.range(2, 6));
            let c = rng.range(1, a * b - 1);
            let (s1, s2) = (a * b, a * b - c);
            Problem {
                question: format!(
                    "{name} buys {a} boxes of {item}. Each box has {b} {item}. {he_cap} uses {c} of them. How many {item} are left?"
                ),
                answer: format!(
                    "The boxes hold {a}*{b}=<<{a}*{b}={s1}>>{s1} {item}.\nAfter using {c}, {s1}-{c}=<<{s1}-{c}={s2}>>{s2} {item} are left.\n#### {s2}"
                ),
                result: s2,
            }
        }
        2 => {
            let (a, b) = (rng.range(2, 6), rng.range(2, 6));
            let c = a * b + rng.range(1, 10);
            let (s1, s2) = (a * b, c - a * b);
            Problem {
                question: format!(
                    "A shop sells {item} for ${a} each. {name} buys {b} {item} and pays with ${c}. How much change does {name} get?"
                ),
                answer: format!(
                    "The {item} cost {a}*{b}=<<{a}*{b}={s1}>>{s1} dollars.\nThe change is {c}-{s1}=<<{c}-{s1}={s2}>>{s2} dollars.\n#### {s2}"
                ),
                result: s2,
            }
        }
        3 => {
            let (a, b) = (rng.range(2, 20), rng.range(2, 20));
            let (s1, s2) = (a * 2, a + b + a * 2);
            Problem {
                question: format!(
                    "{name} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday {he} reads twice as many pages as on Monday. How many pages does {name} read in the three days?"
                ),
                answer: format!(
                    "On Wednesday {he} reads 2*{a}=<<2*{a}={s1}>>{s1} pages.\nIn total {he} reads {a}+{b}+{s1}=<<{a}+{b}+{s1}={s2}>>{s2} pages.\n#### {s2}"
                ),
                result: s2,
            }
        }
        4 => {
            let (a, b) = (rng.range(2, 6), rng.range(2, 6));
            let c = rng.range(2, 10);
            let (s1, s2) = (a * b, a * b + c);
            Problem {
                question: format!(
                    "{name} has {a} bags with {b} {item} in each bag. {other} gives {name} {c} more {item}. How many {item} does {name} have?"
                ),
                answer: format!(
                    "The bags hold {a}*{b}=<<{a}*{b}={s1}>>{s1} {item}.\nWith the gift, {name} has {s1}+{c}=<<{s1}+{c}={s2}>>{s2} {item}.\n#### {s2}"
                ),
                result: s2,
            }
        }
        _ => {
            let a = rng.range(10, 30);
            let b = rng.range(1, a - 1);
            let c = rng.range(2, 3);
            let (s1, s2) = (a - b, (a - b) * c);
            Problem {
                question: format!(
                    "There are {a} {item} on a table. {name} takes {b} of them. {other} then makes the pile {c} times as big. How many {item} are on the table now?"
                ),
                answer: format!(
                    "After {name} takes some, {a}-{b}=<<{a}-{b}={s1}>>{s1} {item} are left.\nThe pile becomes {s1}*{c}=<<{s1}*{c}={s2}>>{s2} {item}.\n#### {s2}"
                ),
                result: s2,
            }
        }
    }
}

/// An unstructured math document: a worked problem (half of them), a list of equations, or
/// facts in words.
pub fn document(rng: &mut Rng) -> String {
    // Half are worked problems: the format the eval asks for, and where the question's numbers
    // must be carried into the solution.
    match rng.below(4) {
        0 | 3 => {
            let p = problem(rng);
            format!("Question: {}\nAnswer: {}", p.question, p.answer)
        }
        1 => (0..rng.range(4, 8))
            .map(|_| {
                let (a, b) = (rng.range(1, 30), rng.range(1, 30));
                match rng.below(3) {
                    0 => format!("{a} + {b} = {}", a + b),
                    1 => format!("{} - {b} = {a}", a + b),
                    _ => format!(
                        "{} * {} = {}",
                        a % 8 + 1,
                        b % 8 + 1,
                        (a % 8 + 1) * (b % 8 + 1)
                    ),
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => (0..rng.range(3, 6))
            .map(|_| {
                let (a, b) = (rng.range(1, 30), rng.range(1, 8));
                match rng.below(3) {
                    0 => format!("The sum of {a} and {b} is {}.", a + b),
                    1 => format!(
                        "The product of {} and {b} is {}.",
                        a % 8 + 1,
                        (a % 8 + 1) * b
                    ),
                    _ => format!("If you take {b} from {}, you get {a}.", a + b),
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}
