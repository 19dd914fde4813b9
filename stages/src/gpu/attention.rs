//! Attention in query chunks with a backward pass that recomputes the probabilities instead
//! of keeping them: flash attention's algorithm (the log-sum-exp of every query row saved
//! from the forward pass; `D = rowsum(dO * O)`; per chunk `P = exp(S - lse)`,
//! `dS = P * (dP - D)`), written over burn tensor ops. Memory for a layer's attention is a
//! chunk's scores, `[rows, heads, CHUNK, t]`, and the masks of one chunk's queries
//! (`llama::mask_rows`): linear in the sequence length, where materialized attention keeps
//! `[rows, heads, t, t]` probabilities (and its mask) per layer.
//!
//! Written by hand because burn 0.22 has no attention backward of its own (its flash kernels
//! are forward-only, and under autodiff it takes the materializing fallback, cubek #272).
//! These are several kernels per chunk, not one fused kernel: the memory of flash attention,
//! not yet its speed. The trainer uses it with activation checkpointing, whose backward pass
//! is written out per block anyway (`trainer::BurnTrainer::checkpointed_grads`).

use std::ops::Range;

use burn::tensor::{Device, Int, Tensor};

use super::llama::mask_rows;

/// Queries per chunk.
pub const CHUNK: usize = 128;

/// One attention problem: the batch's shape, its masks' ingredients and the score scale.
/// Tensors are `[rows, heads, t, head_dim]` in f32, keys and values already expanded to the
/// query heads.
pub struct Problem<'a> {
    /// Rows of the batch.
    pub rows: usize,
    /// Tokens per row (queries and keys).
    pub t: usize,
    /// Document ids `[rows, t]`, where attention stays within documents.
    pub docs: Option<&'a Tensor<2, Int>>,
    /// The layer's sliding window, if it has one.
    pub window: Option<usize>,
    /// What the scores are multiplied by (`1/sqrt(head_dim)` unless the model says).
    pub scale: f32,
    /// Where the masks are made: the device of the tensors, without autodiff.
    pub device: &'a Device,
}

impl Problem<'_> {
    fn chunks(&self) -> impl Iterator<Item = Range<usize>> + use<'_> {
        (0..self.t)
            .step_by(CHUNK)
            .map(|s| s..(s + CHUNK).min(self.t))
    }

    /// Scaled scores of a chunk's queries `[rows, heads, c, t]`, masked to -1e9 (exp gives 0,
    /// as the CPU engine's softmax).
    fn scores(&self, q: Tensor<4>, k: &Tensor<4>, queries: Range<usize>) -> Tensor<4> {
        let s = q.matmul(k.clone().swap_dims(2, 3)).mul_scalar(self.scale);
        let allowed = mask_rows(
            self.rows,
            self.t,
            queries,
            self.docs,
            self.window,
            self.device,
        );
        s.mask_fill(allowed.bool_not(), -1e9)
    }
}

fn rows_of(x: &Tensor<4>, queries: Range<usize>) -> Tensor<4> {
    let [b, h, _, d] = x.dims();
    x.clone().slice([0..b, 0..h, queries, 0..d])
}

/// The attention output `[rows, heads, t, head_dim]` and each query's log-sum-exp of its
/// scores `[rows, heads, t, 1]`.
pub fn forward(p: &Problem, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let mut out = Vec::new();
    let mut lse = Vec::new();
    for queries in p.chunks() {
        let s = p.scores(rows_of(&q, queries.clone()), &k, queries);
        let m = s.clone().max_dim(3);
        let e = (s - m.clone()).exp();
        let l = e.clone().sum_dim(3);
        out.push(e.matmul(v.clone()) / l.clone());
        lse.push(m + l.log());
    }
    (Tensor::cat(out, 2), Tensor::cat(lse, 2))
}

/// The gradients of q, k and v given the output's, `d_out`, from what [`forward`] returned.
pub fn backward(
    p: &Problem,
    (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
    (out, lse): (Tensor<4>, Tensor<4>),
    d_out: Tensor<4>,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let d = (d_out.clone() * out).sum_dim(3);
    let mut dq = Vec::new();
    let mut dk = k.zeros_like();
    let mut dv = v.zeros_like();
    for queries in p.chunks() {
        let qc = rows_of(&q, queries.clone());
        let doc = rows_of(&d_out, queries.clone());
        let probs =
            (p.scores(qc.clone(), &k, queries.clone()) - rows_of(&lse, queries.clone())).exp();
        dv = dv + probs.clone().swap_dims(2, 3).matmul(doc.clone());
        let dp = doc.matmul(v.clone().swap_dims(2, 3));
        let ds = probs * (dp - rows_of(&d, queries));
        dq.push(ds.clone().matmul(k.clone()).mul_scalar(p.scale));
        dk = dk + ds.swap_dims(2, 3).matmul(qc).mul_scalar(p.scale);
    }
    (Tensor::cat(dq, 2), dk, dv)
}
