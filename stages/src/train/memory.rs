//! Device memory a training stage needs, counted from the model's `config.json` before any
//! weight loads: a 7B model that cannot fit is an error naming what it needs and what the
//! device has, not an out-of-memory crash after minutes of uploading weights.
//!
//! The persistent state is counted exactly (what [`crate::gpu::trainer::BurnTrainer`] keeps:
//! f32 trainable weights, one f32 gradient accumulator per trainable weight, the optimizer's
//! f32 moments, LoRA's frozen base in the compute type). Activations are a lower bound: the
//! tensors a backward pass cannot do without (each block's saved inputs, q/k/v, the MLP's
//! hidden activations, attention's probabilities where they are materialized, the logits).
//! So the total is what the device needs at least, before workspaces, temporaries and the
//! allocator's slack: a run it refuses cannot fit.

use crate::cpu::lora;
use crate::gpu::precision::Precision;
use crate::model::arch::Arch;
use crate::model::config::ModelConfig;
use crate::model::weights::Proj;
use crate::train::optim::Rule;

/// What a training run keeps on the device.
pub struct Setup<'a> {
    /// The model's config.
    pub config: &'a ModelConfig,
    /// LoRA's rank and targets; None trains all weights.
    pub lora: Option<(usize, &'a [Proj])>,
    /// The optimizer (its moments per trainable weight).
    pub rule: &'a Rule,
    /// The compute type (LoRA's frozen base is stored in it).
    pub precision: Precision,
    /// Whether blocks are recomputed in the backward pass (only their inputs kept).
    pub checkpointing: bool,
    /// Rows per micro-batch and tokens per row.
    pub micro: usize,
    pub seq: usize,
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
    // compute type. Materialized attention adds its f32 probabilities, one row of the
    // sequence per head; the chunked attention (checkpointing) keeps one log-sum-exp.
    let per_token = 4 * 2 * d + half * (2 * d + q + 2 * kv + q + 3 * f);
    let layer = if setup.checkpointing {
        tokens * per_token + tokens * heads * 4
    } else {
        tokens * (per_token + heads * setup.seq as u64 * 4)
    };
    let logits = tokens * c.vocab_size as u64 * 4;
    // With LoRA nothing before layer 0's first projection trains: its attention norm's
    // input is not kept.
    let untracked = if setup.lora.is_some() {
        tokens * d * 4
    } else {
        0
    };
    let (activations, logits) = if setup.checkpointing {
        // Every block's input, and either the head's logits or one block recomputed: the
        // head's backward ends before the first block is recomputed.
        (layers * tokens * d * 4 + layer.max(logits) - logits, logits)
    } else {
        (layers * layer - untracked, logits)
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
    Footprint {
        parts: vec![
            ("trainable weights (f32)", trainable * 4),
            ("frozen base", frozen * half),
            ("gradients (f32)", trainable * 4),
            (
                match moments {
                    1 => "LionW moment (f32)",
                    _ => "AdamW moments (f32)",
                },
                trainable * 4 * moments,
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

    /// Full finetuning of the 7B shape with LionW keeps f32 weights, gradients and moment:
    /// 80.9 GB (75.3 GiB) before any activation, whatever the compute type, and at least
    /// 77.9 GiB with checkpointing at seq 4096, micro-batch 1: of an 80 GB H100's 79.6 GiB,
    /// under 1.8 GiB is left for workspaces, temporaries and the allocator. LoRA r=256 on all seven
    /// projections keeps the base in bf16 and needs under a third of that.
    #[test]
    fn seven_b_full_finetuning_leaves_little_of_an_80_gb_gpu() {
        let c = llama2_7b();
        let full = footprint(&Setup {
            config: &c,
            lora: None,
            rule: &lion(),
            precision: Precision::Bf16,
            checkpointing: true,
            micro: 1,
            seq: 4096,
        });
        let state: u64 = full.parts[..4].iter().map(|(_, b)| b).sum();
        assert_eq!(state, 3 * 4 * 6_738_415_616);
        assert!(full.total() > 77 * (1 << 30), "{}", full.describe());
        let lora = footprint(&Setup {
            config: &c,
            lora: Some((256, &Proj::ALL)),
            rule: &lion(),
            precision: Precision::Bf16,
            checkpointing: true,
            micro: 1,
            seq: 4096,
        });
        eprintln!(
            "7B full: {}\n7B LoRA r=256: {}",
            full.describe(),
            lora.describe()
        );
        assert!(lora.total() < 26 * (1 << 30), "{}", lora.describe());
        assert!(
            lora.describe().contains("frozen base 12.6 GiB"),
            "{}",
            lora.describe()
        );
    }

    /// Checkpointing's activations grow linearly in the sequence, materialized attention's
    /// quadratically: doubling the sequence at least doubles, and nearly quadruples, them.
    #[test]
    fn activations_grow_as_the_attention_does() {
        let c = llama2_7b();
        let acts = |checkpointing, seq| {
            footprint(&Setup {
                config: &c,
                lora: Some((16, &Proj::ALL)),
                rule: &lion(),
                precision: Precision::F32,
                checkpointing,
                micro: 1,
                seq,
            })
            .parts[5]
                .1 as f64
        };
        let chunked = acts(true, 8192) / acts(true, 4096);
        let materialized = acts(false, 8192) / acts(false, 4096);
        assert!((1.99..2.01).contains(&chunked), "{chunked}");
        assert!(materialized > 3.0, "{materialized}");
    }
}
