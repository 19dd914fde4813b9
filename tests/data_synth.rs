//! The embedded synthetic worlds: determinism, held-out splits, and code that really runs.

mod common;

use std::collections::BTreeSet;

use common::{Workspace, output_named, python, records, shared_data};

const WORLDS: &str = r#"
[stage.world]
kind = "synthetic"
domain = ["general", "math", "code"]
sweep = ["domain"]
docs = 600
pairs = 300
eval = 120
heldout = 60
seed = 11
"#;

fn texts(rs: &[serde_json::Value]) -> Vec<String> {
    rs.iter()
        .map(|r| {
            ["text", "prompt", "response"]
                .iter()
                .filter_map(|f| r[f].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

#[test]
fn worlds_are_deterministic_and_seeded() {
    let a = Workspace::new();
    let b = Workspace::new();
    let p1 = a.write("p.toml", WORLDS);
    let p2 = b.write("p.toml", WORLDS);
    a.run_statuses(&p1, &[]);
    b.run_statuses(&p2, &[]);
    for d in ["general", "math", "code"] {
        let stage = format!("world[domain={d}]");
        let ka = &a.json(&["show", p1.to_str().unwrap(), &stage], true)[0]["outputs"];
        let kb = &b.json(&["show", p2.to_str().unwrap(), &stage], true)[0]["outputs"];
        // Same cache layout in two places: compare the artifact digests (directory names).
        let digest = |v: &serde_json::Value, o: &str| {
            std::path::Path::new(v[o].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_owned()
        };
        for o in ["cpt", "ift", "eval", "heldout"] {
            assert_eq!(
                digest(ka, o),
                digest(kb, o),
                "{stage}.{o} differs between runs"
            );
        }
    }
    let other = a.run_statuses(&p1, &["--set", "stage.world.seed=12"]);
    assert_eq!(common::with_status(&other, "ran").len(), 3);
    let c1 = records(&output_named(&a, &p1, "world[domain=math]", "cpt"));
    let v = a.json(
        &[
            "show",
            p1.to_str().unwrap(),
            "world[domain=math]",
            "--set",
            "stage.world.seed=12",
        ],
        true,
    );
    let c2 = records(std::path::Path::new(
        v[0]["outputs"]["cpt"].as_str().unwrap(),
    ));
    assert_ne!(c1, c2);
}

#[test]
fn held_out_items_never_occur_in_training_data() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", WORLDS);
    ws.run_statuses(&p, &[]);
    // The general world's items probe knowledge its corpus teaches (checked below), so only
    // the math and code worlds hold their eval items out.
    for d in ["math", "code"] {
        let stage = format!("world[domain={d}]");
        let mut training = texts(&records(&output_named(&ws, &p, &stage, "cpt")));
        training.extend(texts(&records(&output_named(&ws, &p, &stage, "ift"))));
        let corpus = training.join("\n\u{1}\n");
        let eval = records(&output_named(&ws, &p, &stage, "eval"));
        // Code: each template holds out a tenth of its constants, about 60 functions in all.
        assert!(eval.len() >= 50, "{stage}: {} eval items", eval.len());
        for item in &eval {
            let identity = match d {
                "math" => item["question"].as_str().unwrap().to_string(),
                // Names are the template's: the signature with the docstring's first line
                // (its constants) is what must never have been trained on.
                _ => item["prompt"]
                    .as_str()
                    .unwrap()
                    .split("\n    >>>")
                    .next()
                    .unwrap()
                    .to_string(),
            };
            assert!(
                !corpus.contains(&identity),
                "{stage}: eval item leaks into training: {identity}"
            );
        }
        let unique: BTreeSet<String> = eval.iter().map(|e| e.to_string()).collect();
        assert_eq!(unique.len(), eval.len(), "{stage}: duplicate eval items");
    }
    // Math answers are arithmetic that checks out, GSM8K style (evaluated by Python).
    let math = records(&output_named(&ws, &p, "world[domain=math]", "eval"));
    let mut calcs = Vec::new();
    for m in &math {
        let answer = m["answer"].as_str().unwrap();
        for calc in answer.split("<<").skip(1) {
            calcs.push(calc.split(">>").next().unwrap().to_string());
        }
        assert!(
            answer
                .rsplit("#### ")
                .next()
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
    }
    assert!(calcs.len() >= 2 * math.len());
    let wrong = python(
        "import json,sys\nfor c in json.loads(sys.argv[1]):\n    l, r = c.split('=')\n    if eval(l) != int(r): print(c)",
        &[&serde_json::to_string(&calcs).unwrap()],
    );
    assert_eq!(wrong, "", "wrong calculations");
}

/// Each option of a multiple-choice item as (context, continuation): HellaSwag and ARC vary
/// the continuation, WinoGrande the context.
fn options(item: &serde_json::Value) -> Vec<(String, String)> {
    let contexts = item["contexts"].as_array().unwrap();
    let continuations = item["continuations"].as_array().unwrap();
    (0..contexts.len().max(continuations.len()))
        .map(|i| {
            let at = |v: &[serde_json::Value]| v[i.min(v.len() - 1)].as_str().unwrap().to_string();
            (at(contexts), at(continuations))
        })
        .collect()
}

#[test]
fn general_items_ask_what_the_corpus_teaches_and_nothing_it_contradicts() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", &WORLDS.replace("docs = 600", "docs = 4000"));
    ws.run_statuses(&p, &[]);
    let stage = "world[domain=general]";
    let corpus = texts(&records(&output_named(&ws, &p, stage, "cpt"))).join("\n\u{1}\n");
    let eval = records(&output_named(&ws, &p, stage, "eval"));
    assert_eq!(eval.len(), 120);
    let styles: BTreeSet<&str> = eval.iter().map(|g| g["style"].as_str().unwrap()).collect();
    assert_eq!(styles, BTreeSet::from(["arc", "hellaswag", "winogrande"]));
    let unique: BTreeSet<String> = eval.iter().map(|e| e.to_string()).collect();
    assert_eq!(unique.len(), eval.len(), "duplicate eval items");
    let mut stated = 0;
    for item in &eval {
        let gold = item["gold"].as_u64().unwrap() as usize;
        let options = options(item);
        assert!(options.len() == 2 || options.len() == 4, "{item}");
        for (i, (context, continuation)) in options.iter().enumerate() {
            // What the option claims: from the context's last sentence on (WinoGrande's
            // meeting sentence names both people and decides nothing).
            let claim = format!("{}{continuation}", context.rsplit(". ").next().unwrap());
            if i == gold {
                stated += usize::from(corpus.contains(claim.as_str()));
            } else {
                assert!(
                    !corpus.contains(claim.as_str()),
                    "the corpus states a wrong option: {claim}"
                );
            }
        }
    }
    // Each fact is stated in several phrasings; nearly every gold claim occurs verbatim.
    assert!(
        stated * 10 >= eval.len() * 9,
        "{stated} of {} stated",
        eval.len()
    );
}

/// Runs HumanEval-shaped items the way the harness does (prompt + completion + test +
/// `check(entry_point)`), each in a fresh namespace; prints `passed failed`.
const RUN_ITEMS: &str = r#"
import json, re, sys
SHIFTABLE = {"add", "multiply", "sum_above", "count_below", "clamp", "max_plus", "repeat"}
passed = failed = 0
for line in open(sys.argv[1]):
    item = json.loads(line)
    body = item["canonical_solution"]
    if sys.argv[2] == "broken":
        body = "    return None\n"
    elif sys.argv[2].startswith("shift"):
        # The first constant of the body moved by +-1: a neighbour of the right answer.
        m = re.search(r"\d+", body)
        if not m or item["entry_point"] not in SHIFTABLE:
            continue
        delta = 1 if sys.argv[2] == "shift+1" else -1
        body = body[:m.start()] + str(int(m.group()) + delta) + body[m.end():]
    program = item["prompt"] + body + item["test"] + "\ncheck(" + item["entry_point"] + ")\n"
    try:
        exec(compile(program, item["task_id"], "exec"), {})
        passed += 1
    except Exception:
        failed += 1
print(passed, failed)
"#;

#[test]
fn code_items_pass_with_their_solution_and_fail_without() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", WORLDS);
    ws.run_statuses(&p, &[]);
    let eval = output_named(&ws, &p, "world[domain=code]", "eval").join("records.jsonl");
    let n = records(eval.parent().unwrap()).len();
    let ok = python(RUN_ITEMS, &[eval.to_str().unwrap(), "canonical"]);
    assert_eq!(
        ok.trim(),
        format!("{n} 0"),
        "every canonical solution passes"
    );
    let broken = python(RUN_ITEMS, &[eval.to_str().unwrap(), "broken"]);
    assert_eq!(
        broken.trim(),
        format!("0 {n}"),
        "every test rejects a wrong solution"
    );
    // The tests tell the stated constant from its neighbours (HumanEval's own tests are
    // written to: a near-miss is wrong).
    for shift in ["shift+1", "shift-1"] {
        let out = python(RUN_ITEMS, &[eval.to_str().unwrap(), shift]);
        let (passed, failed) = out.trim().split_once(' ').unwrap();
        assert_eq!(passed, "0", "{shift}: a neighbouring constant passes");
        assert!(
            failed.parse::<usize>().unwrap() * 2 >= n,
            "{shift}: {failed} of {n} checked"
        );
    }

    // The same harness on the real HumanEval read by the source kind: all 164 pass.
    let he = shared_data("humaneval/HumanEval.jsonl.gz");
    let p = ws.write(
        "h.toml",
        &format!(
            "[stage.he]\nkind = \"source\"\nfiles = [{:?}]\nformat = \"humaneval\"\n",
            he.display().to_string()
        ),
    );
    ws.run_statuses(&p, &[]);
    let items = output_named(&ws, &p, "he", "train").join("records.jsonl");
    assert_eq!(
        python(RUN_ITEMS, &[items.to_str().unwrap(), "canonical"]).trim(),
        "164 0"
    );
}

/// The code world's IFT pairs train the task its eval asks: the request is an eval-shaped
/// prompt (signature and docstring, trimmed as the harness trims it) and the answer is the
/// body, and the prompts hold no number but the body's own constants (a doctest example's
/// numbers were what the small model copied instead, see `code::Problem::prompt`).
#[test]
fn code_pairs_are_the_eval_task_and_prompts_hold_only_the_constants() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", WORLDS);
    ws.run_statuses(&p, &[]);
    let digits = |s: &str| -> BTreeSet<String> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect()
    };
    let pairs = records(&output_named(&ws, &p, "world[domain=code]", "ift"));
    let sources: BTreeSet<String> = texts(&records(&output_named(
        &ws,
        &p,
        "world[domain=code]",
        "cpt",
    )))
    .into_iter()
    .collect();
    let mut in_corpus = 0;
    for r in &pairs {
        let (prompt, response) = (
            r["prompt"].as_str().unwrap(),
            r["response"].as_str().unwrap(),
        );
        assert!(
            prompt.starts_with("def ") && prompt.ends_with("\"\"\""),
            "{prompt:?}"
        );
        assert!(response.starts_with("\n    return "), "{response:?}");
        assert!(
            digits(prompt).is_subset(&digits(response)),
            "{prompt:?} holds a number its body {response:?} does not"
        );
        in_corpus += sources.contains(&format!("{prompt}{response}")) as usize;
    }
    // Pairs and corpus draw from the same training functions: most pairs' text is a
    // corpus document verbatim.
    assert!(
        in_corpus * 2 >= pairs.len(),
        "{in_corpus} of {}",
        pairs.len()
    );
    for item in records(&output_named(&ws, &p, "world[domain=code]", "eval")) {
        let (prompt, body) = (
            item["prompt"].as_str().unwrap(),
            item["canonical_solution"].as_str().unwrap(),
        );
        assert!(!prompt.contains(">>>"), "{prompt:?}");
        assert!(
            digits(prompt).is_subset(&digits(body)),
            "{prompt:?} / {body:?}"
        );
    }
}
