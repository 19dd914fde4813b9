//! Training stages end to end through the real binary: a tiny model pretrained on the
//! synthetic world, then finetuned fully and with LoRA. Kill-and-resume must end bit-identical
//! to an uninterrupted run; a diverging run must stop with the step named.

mod common;

use std::path::{Path, PathBuf};

use common::{Workspace, assert_ok};

/// Data, a tiny fresh model, and a training stage given as TOML.
fn pipeline(train: &str) -> String {
    common::tiny_training_pipeline("train-test", train)
}

const FULL: &str = r#"[stage.train]
kind = "train-full"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 3e-3
optimizer = "adamw"
steps = 40
global_batch = 8
micro_batch = 4
checkpoint_every = 5
attention_dropout = 0.1
hidden_dropout = 0.1
"#;

/// The `train` stage's curve directory and its `summary.json`.
fn curve_and_summary(ws: &Workspace, p: &Path) -> (PathBuf, serde_json::Value) {
    let curve = common::output_named(ws, p, "train", "curve");
    let summary = std::fs::read_to_string(curve.join("summary.json")).unwrap();
    (curve, serde_json::from_str(&summary).unwrap())
}

/// The full-finetuning stage with `params` (TOML lines) added to it.
fn full_with(params: &str) -> String {
    let toml = FULL.replace(
        "kind = \"train-full\"\n",
        &format!("kind = \"train-full\"\n{params}"),
    );
    assert!(toml.contains(params), "{params} added");
    toml
}

fn model_bytes(ws: &Workspace, p: &Path, stage: &str) -> Vec<u8> {
    let dir = ws.output_dir(p, stage);
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn training_learns_and_is_deterministic() {
    let (a, b) = (Workspace::new(), Workspace::new());
    let (pa, pb) = (
        a.write("p.toml", &pipeline(FULL)),
        b.write("p.toml", &pipeline(FULL)),
    );
    assert_ok(&a.flow(&["run", pa.to_str().unwrap()]));
    assert_ok(&b.flow(&["run", pb.to_str().unwrap(), "--threads", "1"]));
    assert_eq!(
        model_bytes(&a, &pa, "train"),
        model_bytes(&b, &pb, "train"),
        "same seed, same bits (whatever the thread count)"
    );
    // The curve: loss falls well below the uniform-guess loss ln(512) = 6.24.
    let curve =
        std::fs::read_to_string(common::output_named(&a, &pa, "train", "curve").join("curve.csv"))
            .unwrap();
    let rows: Vec<Vec<&str>> = curve
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 40);
    let first: f64 = rows[0][3].parse().unwrap();
    let last: f64 = rows[39][3].parse().unwrap();
    let heldout: f64 = rows[39][5].parse().unwrap();
    assert!(first > 5.5, "starts near ln(512): {first}");
    assert!(last < first - 1.5, "learns: {first} -> {last}");
    assert!(
        heldout.is_finite() && heldout < first - 1.0,
        "held-out {heldout}"
    );
}

/// Every stage log of a workspace, concatenated.
fn logs(ws: &Workspace) -> String {
    std::fs::read_dir(ws.cache().join("logs"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

/// The step the log says training resumed at.
fn resumed_step(logs: &str) -> u64 {
    let resumed = logs
        .lines()
        .find_map(|l| l.strip_prefix("resumed from checkpoint at step "))
        .unwrap_or_else(|| panic!("the log says it resumed:\n{logs}"));
    resumed.split_whitespace().next().unwrap().parse().unwrap()
}

/// Runs a pipeline uninterrupted in a fresh workspace; returns it and the pipeline's path.
fn uninterrupted(toml: &str) -> (Workspace, PathBuf) {
    let ws = Workspace::new();
    let p = ws.write("p.toml", toml);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    (ws, p)
}

/// Runs `toml` uninterrupted, and again killed at a checkpoint past step 10 and rerun:
/// asserts the rerun resumed and ended with the uninterrupted run's weights. Returns the
/// uninterrupted workspace.
fn resumes_bit_exactly(toml: &str) -> Workspace {
    let (whole, pw) = uninterrupted(toml);
    let ws = Workspace::new();
    let p = ws.write("p.toml", toml);
    common::kill_at_a_checkpoint(&ws, &p, 10);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let step = resumed_step(&logs(&ws));
    assert!(step >= 10, "resumed at step {step}, not from 0");
    assert_eq!(
        model_bytes(&ws, &p, "train"),
        model_bytes(&whole, &pw, "train"),
        "the resumed run ends with the uninterrupted run's weights"
    );
    whole
}

#[test]
fn a_killed_training_run_resumes_from_its_checkpoint_bit_exactly() {
    resumes_bit_exactly(&pipeline(FULL));
}

#[test]
fn a_killed_wgpu_run_with_dropout_resumes_bit_exactly() {
    // Dropout on a wgpu device (lavapipe in CI) draws from each micro-batch's seed, and every
    // full reduction has a fixed order (`gpu::llama::total`): an uninterrupted run and one
    // killed at a checkpoint and resumed end with the same bits. With burn's atomic `sum`
    // the grad norm differed in its last bits from step 6 on, in three runs of three.
    let on_wgpu = full_with("device = \"wgpu\"\n");
    let whole = resumes_bit_exactly(&pipeline(&on_wgpu));
    assert!(
        logs(&whole).contains("device wgpu"),
        "trained on wgpu:\n{}",
        logs(&whole)
    );
}

/// Moments stored in bf16 on the CPU engine (rounded to nearest-even in f32 words): the
/// checkpoints keep them exactly, so a killed run resumes to the same bits; the rounding
/// changes what trains (it is part of the key), and the log and summary say the type.
#[test]
fn a_killed_run_with_bf16_optimizer_state_resumes_bit_exactly() {
    let bf16 = full_with("optimizer_state = \"bf16\"\n");
    let whole = resumes_bit_exactly(&pipeline(&bf16));
    let log = logs(&whole);
    assert!(log.contains("optimizer state bf16"), "{log}");
    let pw = whole.path().join("p.toml");
    let (_, summary) = curve_and_summary(&whole, &pw);
    assert_eq!(summary["optimizer_state"], "bf16");
    let (f32_state, pf) = uninterrupted(&pipeline(FULL));
    assert_ne!(
        model_bytes(&whole, &pw, "train"),
        model_bytes(&f32_state, &pf, "train"),
        "rounding the moments changes the weights"
    );
    // So it is part of the key: `--set` to f32 names another result, not yet made.
    let ps = pw.to_str().unwrap();
    let as_bf16 = &whole.json(&["explain", ps, "train"], true)[0];
    let set = "stage.train.optimizer_state=\"f32\"";
    let as_f32 = &whole.json(&["explain", ps, "train", "--set", set], true)[0];
    assert_eq!(as_bf16["params"]["optimizer_state"], "\"bf16\"");
    assert!(as_bf16["key"].is_string(), "{as_bf16}");
    assert_ne!(as_bf16["key"], as_f32["key"]);
    assert_eq!(as_f32["done"], false);
}

/// bf16 optimizer state on a device without the type (lavapipe) stops the stage before it
/// loads anything, naming the device and the type.
#[test]
fn bf16_optimizer_state_on_a_device_without_bf16_fails_before_training() {
    let all = failed_full_run("device = \"wgpu\"\noptimizer_state = \"bf16\"\n");
    assert!(
        all.contains("optimizer_state `bf16`") && all.contains("llvmpipe"),
        "{all}"
    );
    assert!(
        !all.contains("training all weights"),
        "it stopped before training: {all}"
    );
}

/// f16 on wgpu (lavapipe has shader-f16): autocast with f32 master weights and a dynamic
/// loss scale that the checkpoints keep, so a killed run resumes to the same bits; the log
/// and summary say the precision and how many steps loss scaling skipped.
#[test]
fn a_killed_f16_wgpu_run_resumes_bit_exactly() {
    let f16 = full_with("device = \"wgpu\"\nprecision = \"f16\"\n");
    let p = pipeline(&f16);
    let whole = resumes_bit_exactly(&p);
    let log = logs(&whole);
    assert!(
        log.contains("device wgpu") && log.contains("precision f16"),
        "{log}"
    );
    let pw = whole.path().join("p.toml");
    let (curve, summary) = curve_and_summary(&whole, &pw);
    assert_eq!(summary["precision"], "f16");
    let skipped = summary["skipped_steps"].as_u64().expect("skipped_steps");
    let csv = std::fs::read_to_string(curve.join("curve.csv")).unwrap();
    let non_finite = csv
        .lines()
        .skip(1)
        .filter(|l| {
            !l.split(',')
                .nth(4)
                .unwrap()
                .parse::<f64>()
                .unwrap()
                .is_finite()
        })
        .count() as u64;
    assert_eq!(
        skipped, non_finite,
        "skipped steps are the curve's non-finite norms"
    );
    assert!(
        log.contains(&format!(
            "{skipped} of 40 steps skipped by f16 loss scaling"
        )),
        "{log}"
    );
    // Another precision is another result: another key, the same pipeline otherwise.
    let ps = pw.to_str().unwrap();
    let as_f16 = &whole.json(&["explain", ps, "train"], true)[0];
    let as_f32 = &whole.json(
        &[
            "explain",
            ps,
            "train",
            "--set",
            "stage.train.precision=\"f32\"",
        ],
        true,
    )[0];
    assert_eq!(as_f16["params"]["precision"], "\"f16\"");
    assert_eq!(as_f32["params"]["precision"], "\"f32\"");
    assert!(as_f16["key"].is_string(), "{as_f16}");
    assert_ne!(as_f16["key"], as_f32["key"], "precision is part of the key");
    // Activation checkpointing is how memory is used, not what is made: the same key, so
    // the run just made is reused (`explain` shows it, and says it is not keyed).
    let recomputing = &whole.json(
        &[
            "explain",
            ps,
            "train",
            "--set",
            "stage.train.activation_checkpointing=true",
        ],
        true,
    )[0];
    assert_eq!(recomputing["params"]["activation_checkpointing"], "true");
    assert_eq!(
        recomputing["unkeyed"],
        serde_json::json!(["activation_checkpointing"])
    );
    assert_eq!(recomputing["key"], as_f16["key"]);
    assert_eq!(recomputing["done"], true);
}

/// Runs the full-finetuning pipeline with `params` added to its stage, asserts that it
/// failed, and returns its stdout, stderr and stage logs together.
fn failed_full_run(params: &str) -> String {
    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline(&full_with(params)));
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert!(!out.status.success(), "{params} ran");
    format!(
        "{}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs(&ws)
    )
}

/// A precision the device cannot compute in stops the stage before it loads anything, with
/// a message naming the device and the type: bf16 on lavapipe (WGSL has no bf16), f16 on
/// flow's CPU engine (f32 only).
#[test]
fn a_precision_the_device_lacks_fails_before_training() {
    for (device, precision, says) in [
        ("wgpu", "bf16", "has no bf16 arithmetic"),
        ("cpu", "f16", "CPU engine computes in f32 only"),
    ] {
        let all = failed_full_run(&format!(
            "device = \"{device}\"\nprecision = \"{precision}\"\n"
        ));
        assert!(
            all.contains(says) && all.contains(precision),
            "{device} {precision}: {all}"
        );
        if device == "wgpu" {
            assert!(all.contains("llvmpipe"), "the device is named: {all}");
        }
        assert!(
            !all.contains("training all weights"),
            "it stopped before training: {all}"
        );
    }
}

/// `device = "cuda"` (a build with `--features cuda`, as the test suite is) checks the
/// driver, NVRTC and the headers before anything loads: on a machine without an NVIDIA
/// driver (CI) the stage fails naming the driver's library, not with a panic.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_driver_fails_naming_what_is_missing() {
    if flow_stages::gpu::cuda::driver_version().is_ok() {
        // A machine with a driver: the device opens; gpu-bench.sh measures it.
        return;
    }
    let all = failed_full_run("device = \"cuda\"\n");
    assert!(
        all.contains("device `cuda`: no NVIDIA driver: libcuda.so.1"),
        "{all}"
    );
    assert!(!all.contains("panicked"), "{all}");
    assert!(!all.contains("training all weights"), "{all}");
}

/// burn's autotune keeps its kernel choices in the user cache directory, where every stage
/// process finds them, not in cubecl's default, the `target/` of the outermost Cargo project
/// above the working directory (a stage runs in its pipeline's directory: here one with a
/// Cargo.toml, as a checkout of a project would be).
#[test]
fn wgpu_stages_keep_autotune_choices_in_the_user_cache() {
    let ws = Workspace::new();
    ws.write("Cargo.toml", "[package]\nname = \"study\"\n");
    let on_wgpu = FULL
        .replace(
            "kind = \"train-full\"\n",
            "kind = \"train-full\"\ndevice = \"wgpu\"\n",
        )
        .replace("steps = 40", "steps = 2");
    assert!(on_wgpu.contains("steps = 2") && on_wgpu.contains("device = \"wgpu\""));
    let p = ws.write("p.toml", &pipeline(&on_wgpu));
    let cache_home = ws.path().join("user-cache");
    // Mesa's shader cache stays where it is (a user's is not emptied with cubecl's): with
    // it in the fresh directory too, lavapipe compiled every kernel and autotune candidate
    // again, and the stage took 232 s instead of 88 s.
    let mesa_home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let out = ws
        .command(&["run", p.to_str().unwrap()])
        .env("XDG_CACHE_HOME", &cache_home)
        .env("MESA_SHADER_CACHE_DIR", &mesa_home)
        .output()
        .unwrap();
    assert_ok(&out);
    let db = cache_home.join("cubecl/default.db");
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    assert!(size > 0, "no autotune cache at {}", db.display());
    assert!(
        !ws.path().join("target").exists(),
        "a cache in the project's target/"
    );
}

/// A Vulkan adapter compiles kernels through cubecl's SPIR-V compiler, and every module a
/// training step builds (matmuls and autotune's candidates, fusion's kernels, flow's RoPE and
/// fused attention through activation checkpointing, the optimizer) passes Khronos'
/// validation layer. cubecl-spirv 0.11.3 declared shared memory as variables holding
/// pointers, which lavapipe crashed on (vendor/cubecl-spirv/PATCH.md); a driver that let
/// invalid SPIR-V through would be undefined behaviour on a user's GPU.
#[test]
fn wgpu_kernels_go_through_spirv_and_pass_vulkans_validation_layer() {
    let layer = Path::new("/usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json");
    assert!(
        layer.exists(),
        "Khronos' validation layer is not installed (apt-get install vulkan-validationlayers; \
         .ci/run does)"
    );
    let ws = Workspace::new();
    let checked = full_with("device = \"wgpu\"\nactivation_checkpointing = true\n")
        .replace("steps = 40", "steps = 2");
    let p = ws.write("p.toml", &pipeline(&checked));
    // The layer writes to stdout by default, which a stage process keeps for its events to
    // flow: its messages go to a file instead, and its start message (info) says it ran.
    let report = ws.path().join("validation.txt");
    let settings = ws.write(
        "layer/vk_layer_settings.txt",
        &format!(
            "khronos_validation.report_flags = info,warn,error\n\
             khronos_validation.debug_action = VK_DBG_LAYER_ACTION_LOG_MSG\n\
             khronos_validation.log_filename = {}\n",
            report.display()
        ),
    );
    let out = ws
        .command(&["run", p.to_str().unwrap()])
        .env("VK_INSTANCE_LAYERS", "VK_LAYER_KHRONOS_validation")
        .env("VK_LAYER_SETTINGS_PATH", settings.parent().unwrap())
        .output()
        .unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stderr), logs(&ws));
    assert_ok(&out);
    assert!(
        all.contains("wgpu<spirv>"),
        "not compiled through SPIR-V:\n{all}"
    );
    let validation = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(
        validation.contains("Khronos Validation Layer Active"),
        "the validation layer did not run in the stage:\n{validation}"
    );
    assert!(!validation.contains("Validation Error"), "{validation}");
}

#[test]
fn a_damaged_checkpoint_is_skipped_for_the_previous_good_one_with_the_same_bits() {
    let (whole, pw) = uninterrupted(&pipeline(FULL));
    let reference = model_bytes(&whole, &pw, "train");

    // The newest checkpoint's weights with bytes flipped, its size kept.
    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline(FULL));
    let (scratch, newest) = common::kill_at_a_checkpoint(&ws, &p, 10);
    let weights = scratch.join(&newest).join("trainable.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 64..] {
        *b ^= 0x5a;
    }
    std::fs::write(&weights, &bytes).unwrap();
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let log = logs(&ws);
    let skipped = format!(
        "checkpoint {newest} is damaged (trainable.safetensors: blake3 mismatch); resuming from ckpt-"
    );
    assert!(log.lines().any(|l| l.starts_with(&skipped)), "{log}");
    let step = resumed_step(&log);
    assert!(
        step >= 5 && format!("ckpt-{step:08}") != newest,
        "resumed at step {step}, past the damaged {newest}"
    );
    assert_eq!(
        model_bytes(&ws, &p, "train"),
        reference,
        "the run resumed from the previous checkpoint ends with the uninterrupted run's weights"
    );

    // Garbage in latest.json: the checkpoints are found without it.
    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline(FULL));
    let (scratch, _) = common::kill_at_a_checkpoint(&ws, &p, 10);
    std::fs::write(scratch.join("latest.json"), "{\"dir\": \"ckpt-0000").unwrap();
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let log = logs(&ws);
    assert!(
        log.lines()
            .any(|l| l.starts_with("latest.json is unreadable (")
                && l.contains("); resuming from ckpt-")),
        "{log}"
    );
    let step = resumed_step(&log);
    assert!(step >= 10, "resumed at step {step}, not from 0");
    assert_eq!(model_bytes(&ws, &p, "train"), reference);
}

const LORA: &str = r#"[stage.lora]
kind = "train-lora"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 1e-2
optimizer = "adamw"
rank = 4
targets = ["attention", "down"]
steps = 40
global_batch = 8
micro_batch = 4
checkpoint_every = 5
lora_dropout = 0.1
hidden_dropout = 0.1
"#;

#[test]
fn a_killed_lora_run_resumes_from_its_checkpoint_bit_exactly() {
    let (whole, pw) = uninterrupted(&pipeline(LORA));

    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline(LORA));
    common::kill_at_a_checkpoint(&ws, &p, 10);
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let step = resumed_step(&logs(&ws));
    assert!(step >= 10, "resumed at step {step}, not from 0");
    let adapter = |ws: &Workspace, p: &Path| {
        std::fs::read(
            common::output_named(ws, p, "lora", "adapter").join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(
        adapter(&ws, &p),
        adapter(&whole, &pw),
        "the resumed run ends with the uninterrupted run's adapters"
    );
    assert_eq!(
        model_bytes(&ws, &p, "lora"),
        model_bytes(&whole, &pw, "lora"),
        "and the same merged model"
    );
    assert_ne!(
        model_bytes(&ws, &p, "lora"),
        model_bytes(&ws, &p, "base"),
        "the adapters trained"
    );
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_its_checkpoints() {
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        &pipeline(
            r#"[stage.train]
kind = "train-full"
model = "base"
data = "rows"
lr = 1e30
optimizer = "lionw"
schedule = "constant"
warmup = 0
clip_grad_norm = 0
steps = 30
checkpoint_every = 1
"#,
        ),
    );
    let out = ws.flow(&["run", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let at = err
        .split("at step ")
        .nth(1)
        .unwrap_or_else(|| panic!("names the step: {err}"));
    let step: u64 = at
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        err.contains("the loss is NaN") || err.contains("the loss is inf"),
        "{err}"
    );
    assert!(step >= 2, "{err}");
    let kept = std::fs::read_dir(ws.cache().join("scratch"))
        .unwrap()
        .flatten()
        .any(|e| e.path().join("latest.json").is_file());
    assert!(kept, "checkpoints are kept for inspection");
}

#[test]
fn lora_trains_only_its_adapters_and_merges_them() {
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        &pipeline(
            r#"[stage.lora]
kind = "train-lora"
model = "base"
data = "rows"
lr = 1e-2
optimizer = "adamw"
rank = 4
targets = ["attention", "down"]
steps = 10
"#,
        ),
    );
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let adapter = common::output_named(&ws, &p, "lora", "adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    let mut modules: Vec<&str> = config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    modules.sort();
    assert_eq!(
        modules,
        ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    );
    // The merged model differs from the base exactly in the adapted matrices.
    let base = flow_tensors(&ws.output_dir(&p, "base").join("model.safetensors"));
    let merged = flow_tensors(&ws.output_dir(&p, "lora").join("model.safetensors"));
    for (name, data) in &base {
        let adapted = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
            .iter()
            .any(|m| name.contains(m));
        if adapted {
            assert_ne!(&merged[name], data, "{name} changed");
        } else {
            assert_eq!(&merged[name], data, "{name} is frozen");
        }
    }
}

/// name -> raw bytes of every tensor of a safetensors file.
fn flow_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let off = v["data_offsets"].as_array().unwrap();
            let (s, e) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            (k.clone(), bytes[8 + n + s..8 + n + e].to_vec())
        })
        .collect()
}

#[test]
fn a_model_imported_from_local_files_keeps_its_weights_bit_exactly() {
    let ws = Workspace::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tied");
    let p = ws.write(
        "p.toml",
        &format!(
            "[stage.base]\nkind = \"model\"\nsource = \"{}/*\"\n",
            fixture.display()
        ),
    );
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let out = ws.output_dir(&p, "base");
    assert_eq!(
        flow_tensors(&out.join("model.safetensors")),
        flow_tensors(&fixture.join("model.safetensors"))
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"], 10000.0);

    // Size params make no sense for an import: the error says so.
    let bad = ws.write(
        "bad.toml",
        &format!(
            "[stage.base]\nkind = \"model\"\nsource = \"{}/*\"\nlayers = 3\n",
            fixture.display()
        ),
    );
    let out = ws.flow(&["run", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("drop the size params"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
