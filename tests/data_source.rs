//! The `source` kind on the real datasets in ../shared/data, and its options.

mod common;

use common::{Workspace, output_named, python, records, shared_data, statuses, with_status};

fn source_stage(name: &str, file: &std::path::Path, format: &str, extra: &str) -> String {
    format!(
        "[stage.{name}]\nkind = \"source\"\nfiles = [{:?}]\nformat = \"{format}\"\n{extra}\n",
        file.display().to_string()
    )
}

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn every_real_dataset_format_is_read() {
    let ws = Workspace::new();
    let gsm = shared_data("gsm8k/test.jsonl");
    let he = shared_data("humaneval/HumanEval.jsonl.gz");
    let arc = shared_data("arc/arc_challenge.jsonl");
    let wino = shared_data("winogrande/winogrande.jsonl");
    let wiki = shared_data("wikitext2/valid.txt");
    let text = [
        source_stage("gsm", &gsm, "gsm8k", ""),
        source_stage("he", &he, "humaneval", ""),
        source_stage("arc", &arc, "arc", ""),
        source_stage("wino", &wino, "winogrande", ""),
        source_stage("wiki", &wiki, "text", "text_unit = \"paragraph\""),
    ]
    .join("\n");
    let p = ws.write("p.toml", &text);
    let s = ws.run_statuses(&p, &[]);
    assert_eq!(with_status(&s, "ran").len(), 5, "{s:?}");

    let g = records(&output_named(&ws, &p, "gsm", "train"));
    assert_eq!(g.len(), count_lines(&gsm));
    assert_eq!(g[0]["type"], "gsm8k");
    assert!(g[0]["question"].as_str().unwrap().starts_with("Janet"));
    assert!(g[0]["answer"].as_str().unwrap().ends_with("#### 18"));

    let h = records(&output_named(&ws, &p, "he", "train"));
    assert_eq!(h.len(), 164);
    assert_eq!(h[0]["entry_point"], "has_close_elements");
    assert_eq!(h[163]["task_id"], "HumanEval/163");

    let a = records(&output_named(&ws, &p, "arc", "train"));
    assert_eq!(a.len(), count_lines(&arc));
    assert!(
        a[0]["contexts"][0]
            .as_str()
            .unwrap()
            .ends_with("rotation?\nAnswer:")
    );
    assert_eq!(
        a[0]["continuations"][2],
        " Planetary days will become shorter."
    );
    assert_eq!(a[0]["gold"], 2);

    let w = records(&output_named(&ws, &p, "wino", "train"));
    assert_eq!(w.len(), count_lines(&wino));
    assert_eq!(
        w[0]["contexts"][1],
        "Sarah was a much better surgeon than Maria so Maria"
    );
    assert_eq!(w[0]["continuations"][0], " always got the easier cases.");

    // Paragraphs as Python splits them: blocks of non-blank lines.
    let expected: usize = python(
        "import sys,re\ntext=open(sys.argv[1]).read()\nprint(sum(1 for b in re.split(r'\\n[ \\t]*\\n', text) if b.strip()))",
        &[wiki.to_str().unwrap()],
    )
    .trim()
    .parse()
    .unwrap();
    let wk = records(&output_named(&ws, &p, "wiki", "train"));
    assert_eq!(wk.len(), expected);
}

/// HellaSwag through flow against lm-evaluation-harness's `preprocess` and `doc_to_text`
/// (re-implemented in Python with its own regex), on all 10,042 validation items.
#[test]
fn hellaswag_matches_lm_eval_preprocessing() {
    let ws = Workspace::new();
    let hs = shared_data("hellaswag/hellaswag_val.jsonl.gz");
    let p = ws.write("p.toml", &source_stage("hs", &hs, "hellaswag", ""));
    ws.run_statuses(&p, &[]);
    let ours = records(&output_named(&ws, &p, "hs", "train"));
    let reference = python(
        r#"
import gzip, json, re, sys
def preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text
for line in gzip.open(sys.argv[1], "rt"):
    doc = json.loads(line)
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if "ctx_a" in doc else doc["ctx"]
    print(json.dumps({"query": preprocess(doc["activity_label"] + ": " + ctx),
                      "choices": [" " + preprocess(e) for e in doc["endings"]],
                      "gold": int(doc["label"])}))
"#,
        &[hs.to_str().unwrap()],
    );
    let reference = common::parse_lines(reference.as_bytes());
    assert_eq!(ours.len(), 10042);
    assert_eq!(reference.len(), ours.len());
    for (o, r) in ours.iter().zip(&reference) {
        assert_eq!(o["contexts"][0], r["query"]);
        assert_eq!(o["continuations"], r["choices"]);
        assert_eq!(o["gold"], r["gold"]);
    }
}

#[test]
fn bad_rows_name_file_line_and_field_or_are_skipped() {
    let ws = Workspace::new();
    ws.write(
        "bad.jsonl",
        "{\"question\": \"a\", \"answer\": \"#### 1\"}\n{\"question\": \"b\", \"answer\": \"#### 2\"}\n{not json\n{\"question\": \"c\", \"answer\": \"#### 3\"}\n{\"question\": \"d\"}\n",
    );
    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"bad.jsonl\"\nformat = \"gsm8k\"\n",
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:3: malformed JSON"), "{err}");

    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"bad.jsonl\"\nformat = \"gsm8k\"\non_bad_row = \"skip\"\n",
    );
    let v = ws.json(&["run", p.to_str().unwrap()], true);
    assert_eq!(with_status(&statuses(&v), "ran"), ["s"]);
    let show = &ws.json(&["show", p.to_str().unwrap(), "s"], true)[0];
    assert_eq!(show["metrics"]["bad_rows"], 2);
    assert_eq!(show["metrics"]["train"], 3);
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output_named(&ws, &p, "s", "train").join("summary.json")).unwrap(),
    )
    .unwrap();
    let examples = summary["bad_row_examples"].to_string();
    assert!(
        examples.contains("bad.jsonl:5: field `answer`: missing"),
        "{examples}"
    );

    // Nothing usable at all is an error, not an empty artifact.
    ws.write("empty.jsonl", "\n");
    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"empty.jsonl\"\nformat = \"gsm8k\"\n",
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no records"));
}

#[test]
fn split_is_stable_disjoint_and_independent_of_shuffle() {
    let ws = Workspace::new();
    let train = shared_data("gsm8k/train.jsonl");
    let base = source_stage("a", &train, "gsm8k", "eval_fraction = 0.1");
    let shuffled = source_stage(
        "b",
        &train,
        "gsm8k",
        "eval_fraction = 0.1\nshuffle = true\nseed = 5",
    );
    let p = ws.write("p.toml", &format!("{base}\n{shuffled}"));
    ws.run_statuses(&p, &[]);
    let q = |stage: &str, out: &str| -> std::collections::BTreeSet<String> {
        records(&output_named(&ws, &p, stage, out))
            .iter()
            .map(|r| r["question"].as_str().unwrap().to_string())
            .collect()
    };
    let (tr, ev) = (q("a", "train"), q("a", "eval"));
    assert!(tr.is_disjoint(&ev));
    assert_eq!(tr.len() + ev.len(), 7473);
    assert!((600..900).contains(&ev.len()), "{} eval records", ev.len());
    assert_eq!(q("b", "eval"), ev, "the split does not depend on shuffling");
    assert_eq!(q("b", "train"), tr);
    let order_a: Vec<_> = records(&output_named(&ws, &p, "a", "train"));
    let order_b: Vec<_> = records(&output_named(&ws, &p, "b", "train"));
    assert_ne!(order_a, order_b, "shuffled");
}

#[test]
fn dedup_limit_and_seeded_shuffle() {
    let ws = Workspace::new();
    let mut lines = String::new();
    for i in 0..50 {
        lines.push_str(&format!("{{\"text\": \"doc {}\"}}\n", i % 20));
    }
    ws.write("d.jsonl", &lines);
    let stage = |name: &str, seed: i64| {
        format!(
            "[stage.{name}]\nkind = \"source\"\nfiles = \"d.jsonl\"\ndedup = true\nshuffle = true\nlimit = 10\nseed = {seed}\n"
        )
    };
    let p = ws.write(
        "p.toml",
        &format!("{}\n{}\n{}", stage("x", 1), stage("y", 1), stage("z", 2)),
    );
    ws.run_statuses(&p, &[]);
    let get = |s: &str| records(&output_named(&ws, &p, s, "train"));
    let (x, y, z) = (get("x"), get("y"), get("z"));
    assert_eq!(x.len(), 10);
    assert_eq!(x, y, "same seed, same bits");
    assert_ne!(x, z);
    let show = &ws.json(&["show", p.to_str().unwrap(), "x"], true)[0];
    assert_eq!(show["metrics"]["duplicates"], 30);
    let unique: std::collections::BTreeSet<_> = x.iter().map(|r| r["text"].to_string()).collect();
    assert_eq!(unique.len(), 10);
}

#[test]
fn json_arrays_stream_and_name_the_item() {
    let ws = Workspace::new();
    ws.write(
        "a.json",
        r#"[{"instruction": "i1", "response": "r1"}, {"instruction": "i2", "response": "r2"}, {"instruction": "i3"}]"#,
    );
    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"a.json\"\nformat = \"magicoder\"\n",
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("a.json:3: field `response`: missing"));
    ws.write(
        "a.json",
        r#"[{"instruction": "i1", "response": "r1"}, {"instruction": "i2", "response": "r2"}]"#,
    );
    ws.run_statuses(&p, &[]);
    let r = records(&output_named(&ws, &p, "s", "train"));
    assert_eq!(
        r[1],
        serde_json::json!({"type": "pair", "prompt": "i2", "response": "r2"})
    );
}

#[test]
fn editing_an_input_file_reruns_what_reads_it() {
    let ws = Workspace::new();
    ws.write("t.txt", "one\n\ntwo\n");
    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"*.txt\"\n",
    );
    assert_eq!(ws.run_statuses(&p, &[])[0].1, "ran");
    assert_eq!(ws.run_statuses(&p, &[])[0].1, "cached");
    ws.write("t.txt", "one\n\ntwo\n\nthree\n");
    assert_eq!(ws.run_statuses(&p, &[])[0].1, "ran");
    assert_eq!(records(&output_named(&ws, &p, "s", "train")).len(), 3);
    let out = ws.flow(&[
        "plan",
        p.to_str().unwrap(),
        "--set",
        "stage.s.files=\"nothing*.txt\"",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no file matches `nothing*.txt`"));
}

/// Parquet as pyarrow writes it (snappy and zstd), nested list columns included.
#[test]
fn parquet_files_written_by_pyarrow_are_read() {
    let ws = Workspace::new();
    python(
        r#####"
import sys, pyarrow as pa, pyarrow.parquet as pq
t = pa.table({"question": [f"q{i}" for i in range(2500)], "answer": [f"#### {i}" for i in range(2500)]})
pq.write_table(t, sys.argv[1] + "/gsm.parquet", compression="snappy", row_group_size=1000)
t = pa.table({"query": ["Question: a?", "Question: b?"], "choices": [["x", "y"], ["z", "w", "v"]], "gold": [1, 2]})
pq.write_table(t, sys.argv[1] + "/arc.parquet", compression="zstd")
"#####,
        &[ws.path().to_str().unwrap()],
    );
    let p = ws.write(
        "p.toml",
        "[stage.g]\nkind = \"source\"\nfiles = \"gsm.parquet\"\nformat = \"gsm8k\"\n\n[stage.a]\nkind = \"source\"\nfiles = \"arc.parquet\"\nformat = \"arc\"\n",
    );
    ws.run_statuses(&p, &[]);
    let g = records(&output_named(&ws, &p, "g", "train"));
    assert_eq!(g.len(), 2500);
    assert_eq!(g[1234]["question"], "q1234");
    assert_eq!(g[2499]["answer"], "#### 2499");
    let a = records(&output_named(&ws, &p, "a", "train"));
    assert_eq!(a[1]["continuations"], serde_json::json!([" z", " w", " v"]));
    assert_eq!(a[1]["gold"], 2);
}

#[test]
fn s3_inputs_stream_from_a_real_s3_server() {
    let s3 = common::S3::shared();
    let gsm = shared_data("gsm8k/test.jsonl");
    s3.put_bytes("data/gsm8k-test.jsonl", &std::fs::read(&gsm).unwrap())
        .unwrap();
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"s3://flow-test/data/gsm8k-test.jsonl\"\nformat = \"gsm8k\"\n",
    );
    let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json"]);
    cmd.envs(s3.env());
    let out = cmd.output().unwrap();
    common::assert_ok(&out);
    let r = records(&output_named(&ws, &p, "s", "train"));
    assert_eq!(r.len(), 1319);
    assert!(r[0]["question"].as_str().unwrap().starts_with("Janet"));
    for log in std::fs::read_dir(ws.cache().join("logs")).unwrap() {
        let text = std::fs::read_to_string(log.unwrap().path()).unwrap();
        assert!(!text.contains(&s3.secret), "credentials leaked into a log");
    }
    // A missing object is a located failure, not a hang or an empty artifact.
    let p = ws.write(
        "p.toml",
        "[stage.s]\nkind = \"source\"\nfiles = \"s3://flow-test/data/missing.jsonl\"\nformat = \"gsm8k\"\n",
    );
    let mut cmd = ws.command(&["run", p.to_str().unwrap()]);
    cmd.envs(s3.env());
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fetching s3://flow-test/data/missing.jsonl")
    );
}

#[test]
fn hub_urls_resolve_with_the_token_and_http_urls_download() {
    let root = tempfile::tempdir().unwrap();
    let repo = root.path().join("datasets/openai/gsm8k/resolve/main/main");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(shared_data("gsm8k/test.jsonl"), repo.join("test.jsonl")).unwrap();
    std::fs::copy(
        shared_data("arc/arc_challenge.jsonl"),
        root.path().join("arc.jsonl"),
    )
    .unwrap();
    let server = common::HttpServer::start(root.path(), "hf_secret_token");
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        &format!(
            "[stage.hub]\nkind = \"source\"\nfiles = \"hf://datasets/openai/gsm8k/main/test.jsonl\"\nformat = \"gsm8k\"\n\n[stage.web]\nkind = \"source\"\nfiles = \"{}/arc.jsonl\"\nformat = \"arc\"\n",
            server.base
        ),
    );
    let run = |token: Option<&str>| {
        let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json"]);
        cmd.env("HF_ENDPOINT", &server.base);
        match token {
            Some(t) => cmd.env("HF_TOKEN", t),
            None => cmd.env_remove("HF_TOKEN"),
        };
        cmd.output().unwrap()
    };
    let denied = run(None);
    assert!(!denied.status.success(), "a gated file needs the token");
    let s = statuses(&common::parse_lines(&denied.stdout));
    assert_eq!(with_status(&s, "ran"), ["web"]);
    let ok = run(Some("hf_secret_token"));
    common::assert_ok(&ok);
    assert_eq!(records(&output_named(&ws, &p, "hub", "train")).len(), 1319);
    assert_eq!(records(&output_named(&ws, &p, "web", "train")).len(), 1172);
    for log in std::fs::read_dir(ws.cache().join("logs")).unwrap() {
        let text = std::fs::read_to_string(log.unwrap().path()).unwrap();
        assert!(
            !text.contains("hf_secret_token"),
            "the token leaked into a log"
        );
    }
}
