//! The `general` world: a small, fixed body of knowledge about people (where each one lives,
//! their job and what it involves, their pet, their favourite colour), told in many phrasings,
//! and multiple-choice items in HellaSwag, ARC and WinoGrande shape that ask about it.
//!
//! Why knowledge and not in-context reasoning: forgetting, in the paper, is the loss of what the
//! base model learned in pretraining (HellaSwag, ARC and WinoGrande probe it). A small model
//! pretrained on this corpus memorizes every fact (each is stated thousands of times), so its
//! score on these items is far above chance, and finetuning on another domain can erode it. An
//! earlier version asked who held an object at the end of a story; a 4-layer model does not
//! learn that state tracking from a million tokens and stayed at chance, leaving nothing to
//! forget. Every fact an item asks about is stated in the corpus (that is the point), and so is
//! an ARC item's question with its right answer (the corpus's Q/A form); the item's wrong
//! options never are.

use super::super::records::Record;
use super::super::rng::Rng;

const NAMES: &[&str] = &[
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Zoe",
];
const PLACES: &[&str] = &[
    "harbor", "castle", "river", "forest", "market", "station", "bridge", "mill", "lake", "church",
    "school", "bakery", "museum", "farm", "park", "beach",
];
/// A job and what its holder does every working day.
const JOBS: &[(&str, &str)] = &[
    ("baker", "bakes bread"),
    ("farmer", "feeds the cows"),
    ("doctor", "helps sick people"),
    ("teacher", "teaches the children"),
    ("fisher", "catches fish"),
    ("painter", "paints pictures"),
    ("pilot", "flies a plane"),
    ("cook", "makes soup"),
    ("tailor", "sews coats"),
    ("driver", "drives a bus"),
    ("singer", "sings songs"),
    ("gardener", "waters the flowers"),
];
const PETS: &[&str] = &[
    "cat", "dog", "rabbit", "parrot", "horse", "goat", "turtle", "hamster",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple",
];
const THINGS: &[&str] = &[
    "stones", "coins", "shells", "letters", "cards", "flowers", "eggs",
];
const MEETING_PLACES: &[&str] = &["park", "market", "station", "library", "garden", "cafe"];

/// What one person is known for. Facts are indices into the tables above.
#[derive(Clone, Copy)]
struct Person {
    name: &'static str,
    home: usize,
    job: usize,
    pet: usize,
    color: usize,
}

/// The four kinds of fact; every item and sentence is about one of them.
#[derive(Clone, Copy, PartialEq)]
enum Fact {
    Home,
    Job,
    Pet,
    Color,
}

const FACTS: [Fact; 4] = [Fact::Home, Fact::Job, Fact::Pet, Fact::Color];

impl Person {
    fn value(&self, fact: Fact) -> usize {
        match fact {
            Fact::Home => self.home,
            Fact::Job => self.job,
            Fact::Pet => self.pet,
            Fact::Color => self.color,
        }
    }
}

/// How many values a fact can take (for drawing wrong options).
fn values(fact: Fact) -> usize {
    match fact {
        Fact::Home => PLACES.len(),
        Fact::Job => JOBS.len(),
        Fact::Pet => PETS.len(),
        Fact::Color => COLORS.len(),
    }
}

/// The world's knowledge: one person per name, facts drawn once from the world's seed, so that
/// the corpus, the held-out documents and the eval items all tell the same facts.
pub struct Knowledge {
    people: Vec<Person>,
}

impl Knowledge {
    pub fn new(rng: &mut Rng) -> Knowledge {
        let people = NAMES
            .iter()
            .map(|&name| Person {
                name,
                home: rng.below(PLACES.len()),
                job: rng.below(JOBS.len()),
                pet: rng.below(PETS.len()),
                color: rng.below(COLORS.len()),
            })
            .collect();
        Knowledge { people }
    }

    fn person(&self, rng: &mut Rng) -> Person {
        *rng.pick(&self.people)
    }

    /// Two different people who differ in `fact`.
    fn pair_differing(&self, rng: &mut Rng, fact: Fact) -> (Person, Person) {
        loop {
            let (a, b) = (self.person(rng), self.person(rng));
            if a.name != b.name && a.value(fact) != b.value(fact) {
                return (a, b);
            }
        }
    }
}

/// A statement of one fact, in one of several phrasings. The eval items ask in three of the
/// corpus's forms: HellaSwag items end one of these sentences ([`scene`]), ARC items use the
/// question form, WinoGrande items the predicate form of meetings.
fn statement(rng: &mut Rng, p: &Person, fact: Fact) -> String {
    let n = p.name;
    match fact {
        Fact::Home => {
            let place = PLACES[p.home];
            match rng.below(3) {
                0 => format!("{n} lives near the {place}."),
                1 => format!("After work, {n} walked home to the {place}."),
                _ => format!("The house of {n} is close to the {place}."),
            }
        }
        Fact::Job => {
            let (job, activity) = JOBS[p.job];
            match rng.below(3) {
                0 => format!("{n} works as a {job}."),
                1 => format!("Every morning, {n} goes to work and {activity}."),
                _ => format!("As a {job}, {n} {activity} every day."),
            }
        }
        Fact::Pet => {
            let pet = PETS[p.pet];
            match rng.below(3) {
                0 => format!("{n} has a {pet}."),
                1 => format!("At home, {n} fed the {pet}."),
                _ => format!("{n} takes good care of a {pet}."),
            }
        }
        Fact::Color => {
            let color = COLORS[p.color];
            match rng.below(2) {
                0 => format!("The favorite color of {n} is {color}."),
                _ => format!("{n} likes the color {color} best."),
            }
        }
    }
}

/// "... was the one who {predicate}": the fact as a predicate, for WinoGrande-shaped items.
fn predicate(fact: Fact, value: usize) -> String {
    match fact {
        Fact::Home => format!("lives near the {}", PLACES[value]),
        Fact::Job => JOBS[value].1.to_string(),
        Fact::Pet => format!("has a {}", PETS[value]),
        Fact::Color => format!("likes {} best", COLORS[value]),
    }
}

/// The ARC-shaped question about a fact, and its answer for a given value.
fn question(p: &Person, fact: Fact) -> String {
    let n = p.name;
    match fact {
        Fact::Home => format!("Where does {n} live?"),
        Fact::Job => format!("What is the job of {n}?"),
        Fact::Pet => format!("What pet does {n} have?"),
        Fact::Color => format!("What is the favorite color of {n}?"),
    }
}

fn answer(fact: Fact, value: usize) -> String {
    match fact {
        Fact::Home => format!("near the {}", PLACES[value]),
        Fact::Job => format!("a {}", JOBS[value].0),
        Fact::Pet => format!("a {}", PETS[value]),
        Fact::Color => COLORS[value].to_string(),
    }
}

/// The HellaSwag-shaped context of a fact about `p`: a statement phrasing cut before its value.
fn scene(p: &Person, fact: Fact) -> String {
    let n = p.name;
    match fact {
        Fact::Home => format!("After work, {n} walked home to the"),
        Fact::Job => format!("Every morning, {n} goes to work and"),
        Fact::Pet => format!("At home, {n} fed the"),
        Fact::Color => format!("{n} likes the color"),
    }
}

/// The ending of a [`scene`] that states `value`.
fn scene_ending(fact: Fact, value: usize) -> String {
    match fact {
        Fact::Home => format!(" {}.", PLACES[value]),
        Fact::Job => format!(" {}.", JOBS[value].1),
        Fact::Pet => format!(" {}.", PETS[value]),
        Fact::Color => format!(" {} best.", COLORS[value]),
    }
}

/// A training document: a short portrait of one person, a meeting of two people told through
/// their facts, questions and answers, or a passage to copy from (an episode, numbers read
/// back). Its identity is its text: the held-out split keeps a tenth of all texts out of
/// training, for held-out perplexity.
pub fn document(rng: &mut Rng, k: &Knowledge) -> (String, String) {
    let text = match rng.below(6) {
        0 | 1 => {
            let p = k.person(rng);
            let mut facts = FACTS.to_vec();
            rng.shuffle(&mut facts);
            facts.truncate(rng.range(2, 4) as usize);
            facts
                .iter()
                .map(|&f| statement(rng, &p, f))
                .collect::<Vec<_>>()
                .join(" ")
        }
        2 => {
            let fact = FACTS[rng.below(4)];
            let (a, b) = k.pair_differing(rng, fact);
            let place = rng.pick(MEETING_PLACES);
            format!(
                "{} and {} met at the {place}. {} was the one who {}. {} was the one who {}.",
                a.name,
                b.name,
                a.name,
                predicate(fact, a.value(fact)),
                b.name,
                predicate(fact, b.value(fact))
            )
        }
        4 => episode(rng),
        5 => numbers_read_back(rng),
        _ => (0..rng.range(1, 3))
            .map(|_| {
                let (p, fact) = (k.person(rng), FACTS[rng.below(4)]);
                format!(
                    "Question: {}\nAnswer: {}",
                    question(&p, fact),
                    answer(fact, p.value(fact))
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    };
    (text.clone(), text)
}

/// A small event whose numbers, things and names recur later in the same document: what a
/// model must copy from its context (the quantities of a word problem, the constant of a
/// function), learned in pretraining as general skill. Without such text the base model never
/// learned to copy, and finetuning on math taught the solution format with made-up numbers.
fn episode(rng: &mut Rng) -> String {
    let (a, b) = (*rng.pick(NAMES), *rng.pick(NAMES));
    let (n, thing, place) = (rng.range(2, 99), rng.pick(THINGS), rng.pick(PLACES));
    let m = rng.range(1, n - 1);
    match rng.below(2) {
        0 => format!(
            "{a} found {n} {thing} near the {place}. {a} took the {n} {thing} home. Now {a} has {n} {thing}."
        ),
        _ => format!(
            "{a} had {n} {thing}. {a} gave {m} {thing} to {b}. {b} said: thank you for the {m} {thing}, {a}."
        ),
    }
}

/// A list of numbers written down and read back: the plainest in-context copy.
fn numbers_read_back(rng: &mut Rng) -> String {
    let (a, b) = (*rng.pick(NAMES), *rng.pick(NAMES));
    let xs: Vec<String> = (0..rng.range(3, 5))
        .map(|_| rng.range(1, 99).to_string())
        .collect();
    let list = xs.join(", ");
    format!("{a} wrote down the numbers {list}. {b} read them back: {list}.")
}

/// An instruction pair: a question about a fact and its answer.
pub fn pair(rng: &mut Rng, k: &Knowledge) -> (Record, String) {
    let (p, fact) = (k.person(rng), FACTS[rng.below(4)]);
    let prompt = question(&p, fact);
    let pair = Record::Pair {
        prompt: prompt.clone(),
        response: format!("{}.", answer(fact, p.value(fact))),
    };
    (pair, prompt)
}

/// `n` distinct wrong values of `fact` besides `right`, then all of them shuffled; returns the
/// values and the position of `right`.
fn options(rng: &mut Rng, fact: Fact, right: usize, n: usize) -> (Vec<usize>, usize) {
    let mut opts = vec![right];
    while opts.len() < n {
        let v = rng.below(values(fact));
        if !opts.contains(&v) {
            opts.push(v);
        }
    }
    rng.shuffle(&mut opts);
    let gold = opts.iter().position(|&v| v == right).expect("present");
    (opts, gold)
}

/// One multiple-choice item of the given style and its identity (its whole text: items are
/// deduplicated by it).
pub fn choice_item(rng: &mut Rng, k: &Knowledge, style: &str) -> (Record, String) {
    let fact = FACTS[rng.below(4)];
    let (contexts, continuations, gold) = match style {
        "hellaswag" => {
            // The ending that states the person's fact against three that state another value.
            let p = k.person(rng);
            let (opts, gold) = options(rng, fact, p.value(fact), 4);
            let context = scene(&p, fact);
            let endings = opts.iter().map(|&v| scene_ending(fact, v)).collect();
            (vec![context], endings, gold)
        }
        "arc" => {
            let p = k.person(rng);
            let (opts, gold) = options(rng, fact, p.value(fact), 4);
            let context = format!("Question: {}\nAnswer:", question(&p, fact));
            let answers = opts
                .iter()
                .map(|&v| format!(" {}", answer(fact, v)))
                .collect();
            (vec![context], answers, gold)
        }
        _ => {
            // WinoGrande: the option (a name) sits in the context, the continuation is fixed:
            // the predicate holds for one of the two people only.
            let (a, b) = k.pair_differing(rng, fact);
            let place = rng.pick(MEETING_PLACES);
            let mut people = [a, b];
            rng.shuffle(&mut people);
            let gold = people
                .iter()
                .position(|p| p.name == a.name)
                .expect("present");
            let contexts = people
                .iter()
                .map(|p| {
                    format!(
                        "{} and {} met at the {place}. {} was the one who",
                        people[0].name, people[1].name, p.name
                    )
                })
                .collect();
            (
                contexts,
                vec![format!(" {}.", predicate(fact, a.value(fact)))],
                gold,
            )
        }
    };
    let identity = format!("{contexts:?}{continuations:?}");
    (
        Record::Choice {
            style: style.into(),
            contexts,
            continuations,
            gold,
        },
        identity,
    )
}
