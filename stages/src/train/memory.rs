//! Device memory a training stage needs, counted from the model's `config.json` before any
//! weight loads: a 7B model that cannot fit is an error naming what it needs and what the
//! device has, not an out-of-memory crash after minutes of uploading weights.
//!
//! The persistent state is counted exactly (what [`crate::gpu::trainer::BurnTrainer`] keeps:
//! f32 trainable weights, one f32 gradient sum per trainable weight, the optimizer's moments
//! in their type, LoRA's frozen base in the compute type), and so are the gradients in flight
//! beside the sums from a step's second micro-batch on: a whole set where the plain backward
//! pass returns them all at once, one block's (or the head's) where the checkpointed one adds
//! them block by block. Activations are a lower bound: the
//! tensors a backward pass cannot do without (each block's saved inputs, q/k/v, the MLP's
//! hidden activations, attention's probabilities where they are materialized, the logits).
//! So the total is what the device needs at least, before workspaces, temporaries and the
//! allocator's slack: a run it refuses cannot fit.

use crate::cpu::lora;
use crate::gpu::precision::Precision;
use crate::model::arch::Arch;
use crate::model::config::ModelConfig;
use crate::model::weights::Proj;
use crate::train::optim::{Rule, StateType};

/// What a training run keeps on the device.
pub struct Setup<'a> {
    /// The model's config.
    pub config: &'a ModelConfig,
    /// LoRA's rank and targets; None trains all weights.
    pub lora: Option<(usize, &'a [Proj])>,
    /// The optimizer (its moments per trainable weight).
    pub rule: &'a Rule,
    /// The type the moments are stored in.
    pub state_type: StateType,
    /// The compute type (LoRA's frozen base is stored in it).
    pub precision: Precision,
    /// Whether blocks are recomputed in the backward pass (only their inputs kept).
    pub checkpointing: bool,
    /// Whether attention probabilities drop out: a recomputed block then materializes them
    /// instead of attending through the fused kernels.
    pub attention_dropout: bool,
    /// Rows per micro-batch and tokens per row.
    pub micro: usize,
    pub seq: usize,
    /// Whether a step sums more than one micro-batch's gradients.
    pub accumulates: bool,
}

/// Bytes by part, in the order a message lists them.
pub struct Footprint {
    pub parts: Vec<(&'static str, u64)>,
}

impl Footprint {
    /// All parts together: what the device needs at least.
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// `weights 25.1 GiB + gradients 25.1 GiB + ...`, for logs and errors.
    pub fn describe(&self) -> String {
        self.parts
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(what, b)| format!("{what} {:.1} GiB", crate::gpu::device::gib(*b)))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// Trainable parameters of LoRA at `rank` on `targets`: `rank x (in + out)` per adapted
/// module (a fused module, Phi-3's `qkv_proj`, once, whole, as PEFT adapts it) per layer.
pub fn lora_params(config: &ModelConfig, arch: &Arch, rank: usize, targets: &[Proj]) -> usize {
    let modules = lora::modules(config, arch, targets).unwrap_or_default();
    let per_layer: usize = modules
        .iter()
        .map(|m| {
            let (out, inp) = lora::module_shape(config, arch, m);
            rank * (inp + out)
        })
        .sum();
    per_layer * config.num_hidden_layers
}

/// The device memory `setup` needs at least; see the module doc for what is exact and what
/// is a lower bound.
pub fn footprint(setup: &Setup) -> Footprint {
    let c = setup.config;
    let arch = Arch::of(c).expect("a validated config");
    let all = c.param_count() as u64;
    let (trainable, frozen) = match setup.lora {
        Some((rank, targets)) => (lora_params(c, &arch, rank, targets) as u64, all),
        None => (all, 0),
    };
    let moments = match setup.rule {
        Rule::LionW { .. } => 1,
        Rule::AdamW { .. } => 2,
    };
    let half = setup.precision.bytes();
    let tokens = (setup.micro * setup.seq) as u64;
    let (d, f, layers) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
    );
    let q = (c.num_attention_heads * c.head_dim()) as u64;
    let kv = (c.kv_heads() * c.head_dim()) as u64;
    let heads = c.num_attention_heads as u64;
    // Per token and layer, what the backward pass reads: the f32 inputs of the two norms,
    // their outputs, q/k/v, attention's output and the MLP's gate, up and activation in the
    // compute type. Materialized attention adds its probabilities, one row of the sequence
    // per head (`per_score` bytes each); the fused attention (checkpointing) keeps one
    // log-sum-exp.
    let per_token = 4 * 2 * d + half * (2 * d + q + 2 * kv + q + 3 * f);
    // Checkpointing attends through the fused kernels (`gpu::flash`) where nothing sits
    // between scores and softmax but the mask (`gpu::trainer::BurnTrainer::checkpointed_grads`).
    let fused = setup.checkpointing && !setup.attention_dropout && arch.attn_softcap.is_none();
    // Materialized attention keeps, per score, the f32 softmax output; with dropout the f32
    // keep-mask and the dropped probabilities (f32, or their cast copy in a half type); in
    // a half type without dropout the probabilities' cast copy.
    let per_score = 4 + match (setup.attention_dropout, half < 4) {
        (false, false) => 0,
        (false, true) => half,
        (true, false) => 4 + 4,
        (true, true) => 4 + half,
    };
    let layer = if fused {
        tokens * per_token + tokens * heads * 4
    } else {
        tokens * (per_token + heads * setup.seq as u64 * per_score)
    };
    let logits = tokens * c.vocab_size as u64 * 4;
    // With LoRA nothing before layer 0's first projection trains: its attention norm's
    // input is not kept.
    let untracked = if setup.lora.is_some() {
        tokens * d * 4
    } else {
        0
    };
    let activations = if setup.checkpointing {
        // Every block's input, and either the head's logits or one block recomputed: the
        // head's backward ends before the first block is recomputed.
        layers * tokens * d * 4 + layer.max(logits) - logits
    } else {
        layers * layer - untracked
    };
    // Without checkpointing, full finetuning in a half type keeps the cast copy of every
    // matmul's weight for the backward pass: the projections and the head (the embedding is
    // looked up in f32, and the norms' weights are not cast).
    let matrices = layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + c.vocab_size as u64 * d;
    let cast_copies = if setup.lora.is_none() && half < 4 && !setup.checkpointing {
        matrices * half
    } else {
        0
    };
    // From a step's second micro-batch on, gradients exist beside the sums before they are
    // added: a plain backward pass returns every one at once; the checkpointed one adds each
    // block's as it makes them, so the largest in flight is a block's share of the trainable
    // weights or, in full finetuning, the head's (its gradient joins the sums first). On
    // lavapipe the pool's reservation for a second micro-batch grows by a fraction of the
    // gradients that doubling the layers adds (gpu_memory
    // `a_second_micro_batch_holds_a_blocks_gradients_not_a_set`).
    let in_flight = match (setup.accumulates, setup.checkpointing) {
        (false, _) => 0,
        (true, false) => trainable,
        (true, true) => match setup.lora {
            Some(_) => trainable.div_ceil(layers),
            None => {
                let vocab = c.vocab_size as u64;
                let outside = vocab * d * if c.tie_word_embeddings { 1 } else { 2 } + d;
                ((all - outside) / layers).max(vocab * d)
            }
        },
    };
    Footprint {
        parts: vec![
            ("trainable weights (f32)", trainable * 4),
            ("frozen base", frozen * half),
            ("gradients (f32)", trainable * 4),
            ("gradients in flight (f32)", in_flight * 4),
            (
                match (moments, setup.state_type) {
                    (1, StateType::F32) => "LionW moment (f32)",
                    (1, StateType::Bf16) => "LionW moment (bf16)",
                    (_, StateType::F32) => "AdamW moments (f32)",
                    (_, StateType::Bf16) => "AdamW moments (bf16)",
                },
                trainable * setup.state_type.bytes() * moments,
            ),
            ("half-precision weight copies", cast_copies),
            ("activations (at least)", activations),
            ("logits (f32)", logits),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-2-7B's config.json (meta-llama/Llama-2-7b-hf).
    fn llama2_7b() -> ModelConfig {
        let mut c = ModelConfig::new(32000, 4096, 11008, 32, 32, 32, 4096, false);
        c.rms_norm_eps = 1e-5;
        c
    }

    fn lion() -> Rule {
        Rule::LionW {
            beta1: 0.9,
            beta2: 0.99,
        }
    }

    /// The parameter counts are the published ones: 6,738,415,616 for Llama-2-7B (its model
    /// card's 7B, transformers' `num_parameters()`), and PEFT's `print_trainable_parameters`
    /// for LoRA r=16 on all seven projections, 39,976,960.
    #[test]
    fn counts_match_transformers_and_peft() {
        let c = llama2_7b();
        assert_eq!(c.param_count(), 6_738_415_616);
        let arch = Arch::of(&c).unwrap();
        assert_eq!(lora_params(&c, &arch, 16, &Proj::ALL), 39_976_960);
    }

    fn gib(bytes: u64) -> f64 {
        crate::gpu::device::gib(bytes)
    }

    fn seven_b(lora: Option<(usize, &[Proj])>, state_type: StateType) -> Footprint {
        footprint(&Setup {
            config: &llama2_7b(),
            lora,
            rule: &lion(),
            state_type,
            precision: Precision::Bf16,
            checkpointing: true,
            attention_dropout: false,
            micro: 1,
            seq: 4096,
            accumulates: true,
        })
    }

    /// Full finetuning of the 7B shape with LionW keeps f32 weights and gradient sums:
    /// with an f32 moment that is 80.9 GB (75.3 GiB) before any activation, whatever the
    /// compute type, and at least 78.6 GiB with checkpointing at seq 4096, micro-batch 1 and
    /// gradient accumulation (a block's gradients in flight beside the sums): of an 80 GB
    /// H100's 79.6 GiB, 1 GiB would be left for workspaces and the allocator. With the moment
    /// in bf16 it needs at least 66.1 GiB, and 13.5 GiB of the 79.6 are left. LoRA r=256 on
    /// all seven projections keeps the base in bf16 and needs under a third of that.
    #[test]
    fn seven_b_full_finetuning_fits_an_80_gb_gpu_with_a_bf16_moment() {
        let params = 6_738_415_616u64;
        let f32_state = seven_b(None, StateType::F32);
        let state = |f: &Footprint| -> u64 {
            let held = [
                "trainable weights",
                "frozen base",
                "gradients (f32)",
                "LionW moment",
            ];
            let parts = f.parts.iter();
            parts
                .filter(|(what, _)| held.iter().any(|h| what.starts_with(h)))
                .map(|(_, b)| b)
                .sum()
        };
        let state_f32 = state(&f32_state);
        assert_eq!(state_f32, 3 * 4 * params);
        assert!(
            f32_state.total() > 77 * (1 << 30),
            "{}",
            f32_state.describe()
        );
        let bf16_state = seven_b(None, StateType::Bf16);
        assert_eq!(state(&bf16_state), (4 + 4 + 2) * params);
        assert!(
            bf16_state.total() < 67 * (1 << 30),
            "{}",
            bf16_state.describe()
        );
        let lora = seven_b(Some((256, &Proj::ALL)), StateType::F32);
        eprintln!(
            "7B full, f32 moment: {:.2} GiB: {}\n7B full, bf16 moment: {:.2} GiB: {}\n\
             7B LoRA r=256: {:.2} GiB: {}",
            gib(f32_state.total()),
            f32_state.describe(),
            gib(bf16_state.total()),
            bf16_state.describe(),
            gib(lora.total()),
            lora.describe()
        );
        assert!(lora.total() < 26 * (1 << 30), "{}", lora.describe());
        assert!(
            lora.describe().contains("frozen base 12.6 GiB"),
            "{}",
            lora.describe()
        );
    }

    /// A plain backward pass returns all of a micro-batch's gradients beside the step's
    /// sums: with more than one micro-batch a step, the footprint counts two sets; the
    /// checkpointed one adds them block by block: the sums and one block's (Llama-2-7B's
    /// 202,383,360 weights a block, its embedding, head and final norm aside).
    #[test]
    fn accumulating_without_checkpointing_counts_two_gradient_sets() {
        let c = llama2_7b();
        let grads = |checkpointing, accumulates| {
            footprint(&Setup {
                config: &c,
                lora: None,
                rule: &lion(),
                state_type: StateType::F32,
                precision: Precision::Bf16,
                checkpointing,
                attention_dropout: false,
                micro: 1,
                seq: 512,
                accumulates,
            })
            .parts
            .iter()
            .filter(|(what, _)| what.starts_with("gradients"))
            .map(|(_, b)| b)
            .sum::<u64>()
        };
        let set = 4 * c.param_count() as u64;
        assert_eq!(grads(false, true), 2 * set);
        assert_eq!(grads(false, false), set);
        assert_eq!(grads(true, false), set);
        let block = 4 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096);
        assert_eq!(block, 4 * 202_383_360);
        assert_eq!(grads(true, true), set + block);
    }

    /// Checkpointing's activations grow linearly in the sequence, materialized attention's
    /// quadratically: doubling the sequence at least doubles, and nearly quadruples, them.
    /// Attention dropout makes a recomputed block materialize its probabilities again.
    #[test]
    fn activations_grow_as_the_attention_does() {
        let c = llama2_7b();
        let acts_with = |checkpointing, attention_dropout, seq| {
            footprint(&Setup {
                config: &c,
                lora: Some((16, &Proj::ALL)),
                rule: &lion(),
                state_type: StateType::F32,
                precision: Precision::F32,
                checkpointing,
                attention_dropout,
                micro: 1,
                seq,
                accumulates: false,
            })
            .parts
            .iter()
            .find(|(what, _)| what.starts_with("activations"))
            .expect("activations are counted")
            .1 as f64
        };
        let acts = |checkpointing, seq| acts_with(checkpointing, false, seq);
        let fused = acts(true, 8192) / acts(true, 4096);
        let materialized = acts(false, 8192) / acts(false, 4096);
        assert!((1.99..2.01).contains(&fused), "{fused}");
        assert!(materialized > 3.0, "{materialized}");
        let dropping = acts_with(true, true, 8192) / acts_with(true, true, 4096);
        assert!(dropping > 2.5, "{dropping}");
    }
}
