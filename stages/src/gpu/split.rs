//! The columns of one fused projection's output (q, k and v; gate and up) as pieces, with a
//! backward step that puts the pieces' gradients side by side in one pass.
//!
//! As burn slices, each piece's backward was autodiff's own: a zero tensor the size of the
//! whole output, the piece's gradient assigned into it, and the pieces' full-size gradients
//! added (burn-autodiff's `float_slice` backward): for q, k and v eight launches and about
//! fifteen passes over an output-sized buffer, on every layer of every step. Here the
//! pieces are one operation: each piece's backward step hands its gradient to what the
//! pieces share, and the last one to run concatenates them (burn's `cat`: one copy of each
//! piece into a new buffer) and registers that as the output's gradient.
//!
//! Written by hand because a burn operation has one output node: several outputs that share
//! one backward step are not something burn-autodiff 0.22 offers. The pieces' steps all run
//! before the step of the tensor they split, whose depth is lower (burn-autodiff runs its
//! tape deepest first), so the gradient is complete when it is needed. A piece whose output
//! takes no part in the loss never runs its step; the split tensor's own step would then
//! find no gradient and burn-autodiff panics, loudly: every piece a model splits off feeds
//! its loss.

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Slice, Tensor};
use burn_cubecl::CubeBackend;

/// Splitting a `[rows, columns]` tensor into column ranges, as an operation of burn's
/// backends: the cubecl backend and fusion slice (views, no copy), autodiff records the
/// backward step of [`PieceBackward`].
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait SplitColumns: Backend {
    /// `y` `[rows, sum of widths]` as consecutive column pieces `[rows, width]`.
    #[fusion(default)]
    fn split_columns(y: FloatTensor<Self>, widths: Vec<usize>) -> Vec<FloatTensor<Self>> {
        let rows = y.shape().dims::<2>()[0];
        let mut at = 0;
        widths
            .iter()
            .map(|&width| {
                let piece = Self::float_slice(
                    y.clone(),
                    &[Slice::from(0..rows), Slice::from(at..at + width)],
                );
                at += width;
                piece
            })
            .collect()
    }
}

impl SplitColumns for CubeBackend {}

/// The pieces' gradients as their steps hand them in, by piece.
type Handed<B> = Arc<Mutex<Vec<Option<FloatTensor<B>>>>>;

/// One piece's backward step: its gradient joins the others', and the last piece's step
/// registers them, concatenated, as the split tensor's gradient.
#[derive(Debug)]
struct PieceBackward {
    index: usize,
}

impl<B: SplitColumns> Backward<B, 1> for PieceBackward {
    type State = Handed<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [Some(parent)] = ops.parents else {
            return;
        };
        let mut handed = ops
            .state
            .lock()
            .expect("no step panicked holding the pieces");
        handed[self.index] = Some(grad);
        if handed.iter().all(Option::is_some) {
            let pieces = handed.drain(..).map(|g| g.expect("every piece")).collect();
            grads.register::<B>(parent.id, B::float_cat(pieces, 1));
        }
    }
}

impl<B: SplitColumns, C: CheckpointStrategy> SplitColumns for Autodiff<B, C> {
    fn split_columns(y: FloatTensor<Self>, widths: Vec<usize>) -> Vec<FloatTensor<Self>> {
        let pieces = B::split_columns(y.clone().into_primitive(), widths);
        let handed: Handed<B> = Arc::new(Mutex::new(vec![None; pieces.len()]));
        pieces
            .into_iter()
            .enumerate()
            .map(|(index, piece)| {
                let (_, node) = y.clone().into_parts();
                let step = PieceBackward { index };
                match step.prepare::<C>([node]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(handed.clone(), piece),
                    OpsKind::UnTracked(prep) => prep.finish(piece),
                }
            })
            .collect()
    }
}

/// `y` `[rows, sum of widths]` as its consecutive column pieces, differentiable in `y`
/// (the backward concatenates the pieces' gradients: see the module's documentation).
pub fn split_columns(y: Tensor<2>, widths: &[usize]) -> Vec<Tensor<2>> {
    Dispatch::split_columns(y.into_dispatch(), widths.to_vec())
        .into_iter()
        .map(Tensor::from_dispatch)
        .collect()
}
