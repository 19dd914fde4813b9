//! Pipelines that say each thing once: `include`, `[template.NAME]` + `use`, references as
//! sweep values, and remote globs (S3 through a real SeaweedFS, the Hub through a local
//! stand-in of its tree API).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Workspace, parse_lines};

/// stage name -> key (or "?") from `flow plan --json`, in plan order.
fn keys(ws: &Workspace, pipeline: &Path, extra: &[&str]) -> Vec<(String, String)> {
    let mut args = vec!["plan", pipeline.to_str().unwrap()];
    args.extend_from_slice(extra);
    ws.json(&args, true)
        .into_iter()
        .filter(|e| e["event"] == "stage")
        .map(|e| {
            (
                e["stage"].as_str().unwrap().to_string(),
                e["key"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// The error events of a failing `flow plan --json`.
fn errors(ws: &Workspace, pipeline: &Path) -> Vec<serde_json::Value> {
    let out = ws.flow(&["plan", pipeline.to_str().unwrap(), "--json"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected a validation error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    parse_lines(&out.stdout)
        .into_iter()
        .filter(|e| e["event"] == "error")
        .collect()
}

/// True when some error is at `file` (suffix) `line` and its message contains `text`.
fn has_error(errors: &[serde_json::Value], file: &str, line: u64, text: &str) -> bool {
    errors.iter().any(|e| {
        e["file"].as_str().is_some_and(|f| f.ends_with(file))
            && e["line"] == line
            && e["message"].as_str().is_some_and(|m| m.contains(text))
    })
}

const STAGE_A: &str = "[stage.a]\nkind = \"command\"\nrun = \"echo a > $FLOW_OUT/a\"\n";

#[test]
fn included_stages_merge_with_the_same_keys_as_written_inline() {
    let ws = Workspace::new();
    // One file...
    let inline = ws.write(
        "inline/p.toml",
        &format!(
            "[pipeline]\nname = \"p\"\n\n{STAGE_A}\n[stage.b]\nkind = \"command\"\nrun = \"cat $FLOW_IN_A/a > $FLOW_OUT/b\"\ninputs = {{ a = \"a\" }}\n\n[stage.c]\nkind = \"command\"\nrun = \"true\"\ninputs = {{ b = \"b\" }}\n\n[profile.x]\n\"stage.a.run\" = \"echo x > $FLOW_OUT/a\"\n\"stage.c.run\" = \"echo c\"\n"
        ),
    );
    // ... and the same split over three, nested, with a diamond (d is included twice).
    let split = ws.write(
        "split/p.toml",
        "[pipeline]\nname = \"p\"\ninclude = [\"lib/b.toml\", \"d.toml\"]\n\n[stage.c]\nkind = \"command\"\nrun = \"true\"\ninputs = { b = \"b\" }\n\n[profile.x]\n\"stage.c.run\" = \"echo c\"\n",
    );
    ws.write(
        "split/lib/b.toml",
        "[pipeline]\ninclude = [\"../a.toml\", \"../d.toml\"]\n\n[stage.b]\nkind = \"command\"\nrun = \"cat $FLOW_IN_A/a > $FLOW_OUT/b\"\ninputs = { a = \"a\" }\n",
    );
    ws.write(
        "split/a.toml",
        &format!("{STAGE_A}\n[profile.x]\n\"stage.a.run\" = \"echo x > $FLOW_OUT/a\"\n"),
    );
    ws.write("split/d.toml", "[template.unused]\nkind = \"command\"\n");
    for extra in [&[][..], &["--profile", "x"][..]] {
        let want = keys(&ws, &inline, extra);
        assert_eq!(want.len(), 3);
        assert_eq!(keys(&ws, &split, extra), want, "{extra:?}");
    }
    // Runs from the split files, and the inline file then finds everything cached.
    let ran = ws.run_statuses(&split, &[]);
    assert_eq!(common::with_status(&ran, "ran").len(), 3);
    let again = ws.run_statuses(&inline, &[]);
    assert_eq!(common::with_status(&again, "cached").len(), 3, "{again:?}");
}

#[test]
fn include_problems_are_located_errors() {
    let ws = Workspace::new();
    // A cycle through two files, named with its path.
    let p = ws.write("cycle/p.toml", "[pipeline]\ninclude = [\"q.toml\"]\n");
    ws.write(
        "cycle/q.toml",
        "[pipeline]\ninclude = [\"p.toml\"]\n\n[stage.x]\nkind = \"command\"\nrun = \"true\"\n",
    );
    let e = errors(&ws, &p);
    assert!(
        has_error(
            &e,
            "cycle/q.toml",
            2,
            "include cycle: p.toml -> q.toml -> p.toml"
        ),
        "{e:?}"
    );
    // A missing include, at the line that names it.
    let p = ws.write(
        "missing/p.toml",
        &format!("[pipeline]\ninclude = [\n  \"nope.toml\",\n]\n\n{STAGE_A}"),
    );
    let e = errors(&ws, &p);
    assert!(
        has_error(&e, "missing/p.toml", 3, "cannot read the included file")
            && has_error(&e, "missing/p.toml", 3, "missing/nope.toml`: No such file"),
        "{e:?}"
    );
    // A stage defined in two files: the error at the second, naming the first.
    let p = ws.write(
        "dup/p.toml",
        &format!("[pipeline]\ninclude = [\"common.toml\"]\n\n{STAGE_A}"),
    );
    ws.write("dup/common.toml", &format!("# shared\n{STAGE_A}"));
    let e = errors(&ws, &p);
    let dup = e
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("stage `a` is defined twice")
        })
        .unwrap_or_else(|| panic!("{e:?}"));
    assert!(dup["file"].as_str().unwrap().ends_with("dup/p.toml"));
    assert_eq!(dup["line"], 4);
    assert!(
        dup["help"].as_str().unwrap().contains("dup/common.toml:2:"),
        "{dup}"
    );
    // A profile setting given in two files, and [pipeline] settings in an included file.
    let p = ws.write(
        "prof/p.toml",
        &format!("[pipeline]\ninclude = [\"inc.toml\"]\n\n{STAGE_A}\n[profile.x]\n\"stage.a.run\" = \"true\"\n"),
    );
    ws.write(
        "prof/inc.toml",
        "[pipeline]\nseed = 3\n\n[profile.x.stage.a]\nrun = \"false\"\n",
    );
    let e = errors(&ws, &p);
    assert!(
        has_error(&e, "prof/p.toml", 9, "profile `x` sets `stage.a.run` twice"),
        "{e:?}"
    );
    assert!(
        has_error(
            &e,
            "prof/inc.toml",
            2,
            "`pipeline.seed` in an included file"
        ),
        "{e:?}"
    );
    // An error inside an included stage points into the included file.
    let p = ws.write("typo/p.toml", "[pipeline]\ninclude = [\"inc.toml\"]\n");
    ws.write(
        "typo/inc.toml",
        "\n\n[stage.a]\nkind = \"command\"\nrun = \"true\"\nrnu = 1\n",
    );
    let e = errors(&ws, &p);
    assert!(
        has_error(&e, "typo/inc.toml", 6, "unknown param `rnu`"),
        "{e:?}"
    );
}

const EVAL_LIKE: &str = "[template.t]\nkind = \"command\"\nrun = \"echo $X > $FLOW_OUT/o\"\nenv = { X = \"shared\" }\nseed = 5\n\n";

#[test]
fn templates_resolve_stage_first_then_template_and_profiles_reach_every_user() {
    let ws = Workspace::new();
    let templated = ws.write(
        "t/p.toml",
        &format!(
            "{EVAL_LIKE}[stage.one]\nuse = \"t\"\n\n[stage.two]\nuse = \"t\"\nseed = 9\n\n[profile.p]\n\"template.t.seed\" = 7\n\"template.t.env\" = {{ X = \"profiled\" }}\n"
        ),
    );
    let written = ws.write(
        "w/p.toml",
        "[stage.one]\nkind = \"command\"\nrun = \"echo $X > $FLOW_OUT/o\"\nenv = { X = \"shared\" }\nseed = 5\n\n\
         [stage.two]\nkind = \"command\"\nrun = \"echo $X > $FLOW_OUT/o\"\nenv = { X = \"shared\" }\nseed = 9\n\n\
         [profile.p]\n\"stage.one.seed\" = 7\n\"stage.one.env\" = { X = \"profiled\" }\n\"stage.two.env\" = { X = \"profiled\" }\n",
    );
    // Same stages and keys as writing every param out; the stage's own `seed` beats the
    // template's, and beats a profile's template override too.
    for extra in [&[][..], &["--profile", "p"][..]] {
        let want = keys(&ws, &written, extra);
        assert_eq!(keys(&ws, &templated, extra), want, "{extra:?}");
    }
    assert_ne!(
        keys(&ws, &templated, &[]),
        keys(&ws, &templated, &["--profile", "p"])
    );
    // `flow explain` says where each param came from.
    let explained = ws.json(&["explain", templated.to_str().unwrap(), "two"], true);
    let origins = &explained[0]["origins"];
    assert!(
        origins["run"].as_str().unwrap().contains("t/p.toml:3:")
            && origins["run"].as_str().unwrap().contains("template `t`"),
        "{origins}"
    );
    assert!(
        origins["seed"].as_str().unwrap().contains("t/p.toml:12:")
            && !origins["seed"].as_str().unwrap().contains("template"),
        "{origins}"
    );
    assert_eq!(origins["workdir"], serde_json::Value::Null, "{origins}");
    assert_eq!(origins["outputs"], "default", "{origins}");
    // `flow show` of the finished stage prints the same, with a profile's template override
    // located at the profile's line.
    ws.run_statuses(&templated, &["--profile", "p"]);
    let shown = ws.json(
        &["show", templated.to_str().unwrap(), "one", "--profile", "p"],
        true,
    );
    let seed = &shown[0]["params"]["seed"];
    assert_eq!(seed["value"], "i:7", "{seed}");
    assert!(
        seed["from"].as_str().unwrap().contains("t/p.toml:15:")
            && seed["from"].as_str().unwrap().contains("template `t`"),
        "{seed}"
    );
    // Located errors: an unknown template (with a hint), and a template using a template.
    let bad = ws.write(
        "bad/p.toml",
        &format!("{EVAL_LIKE}[template.u]\nuse = \"t\"\n\n[stage.one]\nuse = \"tt\"\n"),
    );
    let e = errors(&ws, &bad);
    assert!(
        has_error(&e, "bad/p.toml", 11, "there is no [template.tt]"),
        "{e:?}"
    );
    assert!(
        has_error(&e, "bad/p.toml", 8, "templates do not nest"),
        "{e:?}"
    );
}

/// Cheap real stages with a plain reference param: a tiny world, tokenizers trained on it
/// (one single, one swept over two vocabularies), and models initialized from them.
const WORLD_AND_TOKENIZERS: &str = "[stage.docs]\nkind = \"synthetic\"\ndomain = \"general\"\ndocs = 40\npairs = 10\neval = 5\nheldout = 5\n\n\
    [stage.tok_small]\nkind = \"tokenize\"\nvocab_size = 280\ntrain_data = [\"docs.cpt\"]\n\n\
    [stage.tok]\nkind = \"tokenize\"\nvocab_size = [300, 320]\nsweep = [\"vocab_size\"]\ntrain_data = [\"docs.cpt\"]\n\n";
const INIT: &str =
    "kind = \"model\"\nhidden_size = 32\nlayers = 1\nheads = 2\nkv_heads = 1\nmax_positions = 32\n";

#[test]
fn a_swept_reference_fans_out_over_every_member_of_every_referenced_stage() {
    let ws = Workspace::new();
    let swept = ws.write(
        "s/p.toml",
        &format!("{WORLD_AND_TOKENIZERS}[stage.init]\n{INIT}tokenizer = [\"tok_small.tokenizer\", \"tok.tokenizer\"]\nsweep = [\"tokenizer\"]\n"),
    );
    let written = ws.write(
        "w/p.toml",
        &format!("{WORLD_AND_TOKENIZERS}[stage.init_small]\n{INIT}tokenizer = \"tok_small.tokenizer\"\n\n[stage.init_tok]\n{INIT}tokenizer = \"tok.tokenizer\"\n"),
    );
    let ran = ws.run_statuses(&swept, &[]);
    assert!(common::with_status(&ran, "failed").is_empty(), "{ran:?}");
    let got: BTreeMap<String, String> = keys(&ws, &swept, &[]).into_iter().collect();
    let want: BTreeMap<String, String> = keys(&ws, &written, &[]).into_iter().collect();
    let inits: Vec<&str> = got
        .keys()
        .filter(|k| k.starts_with("init"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        inits,
        [
            "init[tokenizer=tok.tokenizer,vocab_size=300]",
            "init[tokenizer=tok.tokenizer,vocab_size=320]",
            "init[tokenizer=tok_small.tokenizer]",
        ]
    );
    // Each member has the key the separately written stage has: the name is not in the key.
    assert_eq!(
        got["init[tokenizer=tok_small.tokenizer]"],
        want["init_small"]
    );
    assert_eq!(
        got["init[tokenizer=tok.tokenizer,vocab_size=300]"],
        want["init_tok[vocab_size=300]"]
    );
    assert_eq!(
        got["init[tokenizer=tok.tokenizer,vocab_size=320]"],
        want["init_tok[vocab_size=320]"]
    );
    assert_ne!(
        got["init[tokenizer=tok.tokenizer,vocab_size=300]"],
        got["init[tokenizer=tok.tokenizer,vocab_size=320]"]
    );
    // Already done: the written-out pipeline runs nothing new.
    let again = ws.run_statuses(&written, &[]);
    assert_eq!(
        common::with_status(&again, "ran"),
        Vec::<String>::new(),
        "{again:?}"
    );
}

/// `files` of a stage as `flow explain --json` shows it (the expanded list).
fn explained_files(ws: &Workspace, pipeline: &Path, stage: &str, env: &[(&str, String)]) -> String {
    ws.json_with(&["explain", pipeline.to_str().unwrap(), stage], env, true)[0]["params"]["files"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (key of `stage`, stderr) from `flow plan --json` with `env`; None when the plan failed.
fn plan_with(
    ws: &Workspace,
    pipeline: &Path,
    stage: &str,
    env: &[(&str, String)],
) -> (Option<String>, String) {
    let mut cmd = ws.command(&["plan", pipeline.to_str().unwrap(), "--json"]);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !out.status.success() {
        return (None, stderr);
    }
    let key = parse_lines(&out.stdout)
        .into_iter()
        .find(|e| e["stage"] == stage)
        .and_then(|e| e["key"].as_str().map(str::to_string));
    (key, stderr)
}

#[test]
fn s3_globs_expand_by_listing_and_a_changed_object_changes_the_key() {
    let s3 = common::S3::shared();
    let prefix = format!("globs-{}", std::process::id());
    let row = |t: &str| format!("{{\"text\": \"{t}\"}}\n");
    s3.put_bytes(&format!("{prefix}/a/1.jsonl"), row("one").as_bytes())
        .unwrap();
    s3.put_bytes(&format!("{prefix}/a/b/2.jsonl"), row("two").as_bytes())
        .unwrap();
    s3.put_bytes(&format!("{prefix}/a/3.txt"), b"not matched")
        .unwrap();
    s3.put_bytes(&format!("{prefix}/other/4.jsonl"), row("four").as_bytes())
        .unwrap();
    let ws = Workspace::new();
    let stage = |pattern: &str| {
        format!(
            "[stage.s]\nkind = \"source\"\nfiles = \"s3://flow-test/{prefix}/{pattern}\"\nformat = \"text\"\n"
        )
    };
    let deep = ws.write("deep.toml", &stage("a/**/*.jsonl"));
    let shallow = ws.write("shallow.toml", &stage("a/*.jsonl"));
    let env = s3.env();
    assert_eq!(
        explained_files(&ws, &deep, "s", &env),
        format!(
            "@files[\"s3://flow-test/{prefix}/a/1.jsonl\",\"s3://flow-test/{prefix}/a/b/2.jsonl\"]"
        )
    );
    assert_eq!(
        explained_files(&ws, &shallow, "s", &env),
        format!("@files[\"s3://flow-test/{prefix}/a/1.jsonl\"]")
    );
    // The matched objects download and read like any input.
    let mut cmd = ws.command(&["run", deep.to_str().unwrap(), "--json"]);
    cmd.envs(env.clone());
    common::assert_ok(&cmd.output().unwrap());
    let train =
        ws.json_with(&["show", deep.to_str().unwrap(), "s"], &env, true)[0]["outputs"]["train"]
            .as_str()
            .unwrap()
            .to_string();
    let texts: Vec<String> = common::records(Path::new(&train))
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    // Replacing an object under the same name changes its e-tag, and so the key.
    let before = plan_with(&ws, &deep, "s", &env).0.unwrap();
    assert_eq!(
        plan_with(&ws, &deep, "s", &env).0.unwrap(),
        before,
        "listing is stable"
    );
    s3.put_bytes(
        &format!("{prefix}/a/b/2.jsonl"),
        row("two, edited").as_bytes(),
    )
    .unwrap();
    assert_ne!(plan_with(&ws, &deep, "s", &env).0.unwrap(), before);
    // A glob that matches nothing is a located error.
    let none = ws.write("none.toml", &stage("a/*.parquet"));
    let (key, stderr) = plan_with(&ws, &none, "s", &env);
    assert!(key.is_none());
    assert!(
        stderr.contains("none.toml:3:") && stderr.contains("no file matches"),
        "{stderr}"
    );
}

#[test]
fn hub_globs_list_the_tree_api_page_by_page_with_the_token() {
    let root = tempfile::tempdir().unwrap();
    // The Hub's parquet conversion branch (`refs/convert/parquet`), as a revision in a URL.
    let shards = root
        .path()
        .join("datasets/o/n/resolve/refs/convert/parquet/default/train");
    std::fs::create_dir_all(shards.join("nested")).unwrap();
    for i in 0..5 {
        std::fs::write(shards.join(format!("{i:04}.parquet")), format!("shard {i}")).unwrap();
    }
    std::fs::write(shards.join("README.md"), "not a shard").unwrap();
    std::fs::write(shards.join("nested/9999.parquet"), "deeper").unwrap();
    // Pages of two entries: the listing must follow three `Link` headers.
    let server = common::HttpServer::with_page(root.path(), "hf_token", 2);
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        "[stage.corpus]\nkind = \"source\"\nfiles = \"hf://datasets/o/n@refs%2Fconvert%2Fparquet/default/train/*.parquet\"\nformat = \"text\"\n",
    );
    let env = vec![
        ("HF_ENDPOINT", server.base.clone()),
        ("HF_TOKEN", "hf_token".to_string()),
    ];
    let want: Vec<String> = (0..5)
        .map(|i| {
            format!("\"hf://datasets/o/n@refs%2Fconvert%2Fparquet/default/train/{i:04}.parquet\"")
        })
        .collect();
    assert_eq!(
        explained_files(&ws, &p, "corpus", &env),
        format!("@files[{}]", want.join(","))
    );
    let key = plan_with(&ws, &p, "corpus", &env).0.unwrap();
    // A shard's new content (a new LFS sha256) changes the key.
    std::fs::write(shards.join("0003.parquet"), "shard 3, regenerated").unwrap();
    assert_ne!(plan_with(&ws, &p, "corpus", &env).0.unwrap(), key);
    // Without the token the gated listing fails, located, with the reason.
    let (none, stderr) = plan_with(&ws, &p, "corpus", &env[..1]);
    assert!(none.is_none());
    assert!(
        stderr.contains("p.toml:3:") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );
    // `**` lists recursively.
    let deep = ws.write(
        "deep.toml",
        "[stage.corpus]\nkind = \"source\"\nfiles = \"hf://datasets/o/n@refs%2Fconvert%2Fparquet/default/**/*.parquet\"\nformat = \"text\"\n",
    );
    let files = explained_files(&ws, &deep, "corpus", &env);
    assert!(
        files.contains("train/nested/9999.parquet") && files.contains("train/0004.parquet"),
        "{files}"
    );
    assert!(!files.contains("README"), "{files}");
}
