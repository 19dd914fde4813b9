//! The `general` world: short stories about people, places and coloured objects whose facts
//! stay consistent (who is where, who holds what), and multiple-choice items in HellaSwag,
//! ARC and WinoGrande shape whose right answer follows from the story.

use super::super::records::Record;
use super::super::rng::Rng;

const NAMES: &[&str] = &[
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Zoe",
];
const PLACES: &[&str] = &[
    "kitchen", "garden", "library", "school", "park", "market", "beach", "forest", "station",
    "bakery", "museum", "river", "farm", "office", "harbor", "castle",
];
const OBJECTS: &[&str] = &[
    "ball", "book", "kite", "cup", "hat", "lamp", "box", "key", "map", "coin", "drum", "shell",
    "bag", "clock", "flute", "scarf",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple",
];
const MOODS: &[&str] = &["happy", "tired", "curious", "calm", "excited", "quiet"];

/// A story and the facts at its end.
pub struct Story {
    pub sentences: Vec<String>,
    /// (person, place) at the end.
    pub location: Vec<(String, String)>,
    /// The object that changed hands, its colour, and its final owner.
    pub object: String,
    pub color: String,
    pub owner: String,
    pub giver: String,
}

impl Story {
    pub fn text(&self) -> String {
        self.sentences.join(" ")
    }

    fn place_of(&self, who: &str) -> &str {
        &self
            .location
            .iter()
            .find(|(n, _)| n == who)
            .expect("known person")
            .1
    }

    /// The closing sentence the facts imply (the pattern every training story ends with).
    fn ending(owner: &str, color: &str, object: &str, place: &str) -> String {
        format!("In the {place}, {owner} played with the {color} {object}.")
    }
}

fn distinct<'a>(rng: &mut Rng, pool: &'a [&'a str], n: usize) -> Vec<&'a str> {
    let mut items: Vec<&str> = pool.to_vec();
    rng.shuffle(&mut items);
    items.truncate(n);
    items
}

/// A story whose last sentence is withheld into `Story` facts (callers add it or not).
pub fn story(rng: &mut Rng) -> Story {
    let people = distinct(rng, NAMES, 3);
    let places = distinct(rng, PLACES, 3);
    let (a, b, c) = (people[0], people[1], people[2]);
    let object = *rng.pick(OBJECTS);
    let color = *rng.pick(COLORS);
    let mut s = Vec::new();
    let mut loc = vec![
        (a.to_string(), places[0].to_string()),
        (b.to_string(), places[1].to_string()),
        (c.to_string(), places[2].to_string()),
    ];
    match rng.below(3) {
        0 => s.push(format!("One morning {a} was in the {}.", places[0])),
        1 => s.push(format!("{a} spent the day in the {}.", places[0])),
        _ => s.push(format!(
            "It was a sunny day, and {a} was in the {}.",
            places[0]
        )),
    }
    s.push(format!("{b} was in the {}.", places[1]));
    s.push(format!("{c} stayed in the {}.", places[2]));
    s.push(format!("{a} had a {color} {object}."));
    s.push(format!("{a} felt {}.", rng.pick(MOODS)));
    // a walks to b and hands over the object; sometimes c moves too.
    s.push(format!("{a} walked to the {}.", places[1]));
    loc[0].1 = places[1].to_string();
    s.push(format!("{a} gave the {color} {object} to {b}."));
    if rng.below(2) == 0 {
        let p = *rng.pick(PLACES);
        s.push(format!("Later, {c} went to the {p}."));
        loc[2].1 = p.to_string();
    }
    Story {
        sentences: s,
        location: loc,
        object: object.into(),
        color: color.into(),
        owner: b.into(),
        giver: a.into(),
    }
}

/// A training document (the story, its implied ending, sometimes a question and answer)
/// and its identity, the story's text.
pub fn document(rng: &mut Rng) -> (String, String) {
    let st = story(rng);
    let identity = st.text();
    let mut text = st.text();
    text.push(' ');
    text.push_str(&Story::ending(
        &st.owner,
        &st.color,
        &st.object,
        st.place_of(&st.owner),
    ));
    if rng.below(2) == 0 {
        let (q, a) = question(rng, &st);
        text.push_str(&format!("\nQuestion: {q}\nAnswer: {a}"));
    }
    (text, identity)
}

fn question(rng: &mut Rng, st: &Story) -> (String, String) {
    let (who, place) = st.location[rng.below(st.location.len())].clone();
    match rng.below(2) {
        0 => (
            format!("Where was {who} at the end?"),
            format!("the {place}"),
        ),
        _ => (
            format!("Who had the {} {} at the end?", st.color, st.object),
            st.owner.clone(),
        ),
    }
}

/// An instruction pair (a story and a question about it) and its identity.
pub fn pair(rng: &mut Rng) -> (Record, String) {
    let st = story(rng);
    let (q, a) = question(rng, &st);
    let pair = Record::Pair {
        prompt: format!("{}\nQuestion: {q}", st.text()),
        response: format!("{a}."),
    };
    (pair, st.text())
}

/// One multiple-choice item of the given style, with its story's text (to keep it out of
/// training data).
pub fn choice_item(rng: &mut Rng, style: &str) -> (Record, String) {
    let st = story(rng);
    let text = st.text();
    let place = st.place_of(&st.owner).to_string();
    let (contexts, continuations, gold) = match style {
        "hellaswag" => {
            // The ending that fits the facts against endings with a wrong owner, colour or place.
            let wrong_owner = st.giver.clone();
            let wrong_color = *rng.pick(
                &COLORS
                    .iter()
                    .copied()
                    .filter(|c| *c != st.color)
                    .collect::<Vec<_>>(),
            );
            let wrong_place = *rng.pick(
                &PLACES
                    .iter()
                    .copied()
                    .filter(|p| *p != place)
                    .collect::<Vec<_>>(),
            );
            let mut endings = vec![
                Story::ending(&st.owner, &st.color, &st.object, &place),
                Story::ending(&wrong_owner, &st.color, &st.object, &place),
                Story::ending(&st.owner, wrong_color, &st.object, &place),
                Story::ending(&st.owner, &st.color, &st.object, wrong_place),
            ];
            let right = endings[0].clone();
            rng.shuffle(&mut endings);
            let gold = endings.iter().position(|e| *e == right).expect("present");
            (
                vec![text.clone()],
                endings.into_iter().map(|e| format!(" {e}")).collect(),
                gold,
            )
        }
        "arc" => {
            let (who, right) = st.location[rng.below(st.location.len())].clone();
            let mut options: Vec<String> = vec![right.clone()];
            while options.len() < 4 {
                let p = rng.pick(PLACES).to_string();
                if !options.contains(&p) {
                    options.push(p);
                }
            }
            rng.shuffle(&mut options);
            let gold = options.iter().position(|o| *o == right).expect("present");
            (
                vec![format!(
                    "{text}\nQuestion: Where was {who} at the end?\nAnswer:"
                )],
                options.iter().map(|o| format!(" the {o}")).collect(),
                gold,
            )
        }
        _ => {
            // WinoGrande: the option sits in the context, the continuation is fixed. The
            // giver walked over to the owner, so only the hand-over tells them apart.
            let mut options = vec![st.owner.clone(), st.giver.clone()];
            rng.shuffle(&mut options);
            let gold = options
                .iter()
                .position(|o| *o == st.owner)
                .expect("present");
            (
                options
                    .iter()
                    .map(|o| format!("{text} At the end, {o} had the"))
                    .collect(),
                vec![format!(" {} {}.", st.color, st.object)],
                gold,
            )
        }
    };
    (
        Record::Choice {
            style: style.into(),
            contexts,
            continuations,
            gold,
        },
        text,
    )
}
