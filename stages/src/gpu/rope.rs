//! RoPE as one kernel each way: each pair `(x1, x2)` of a head's columns `d` and `d + half`
//! becomes `(x1 cos - x2 sin, x2 cos + x1 sin)` at its token's angle (the rotate-half
//! layout). As burn tensor operations it took a flip of a `[.., 2, half]` view (a kernel of
//! its own, which also ends fusion's elementwise chain) and a fused multiply-add after it,
//! and autodiff's backward was as many again. Here the forward is one launch, one unit a
//! pair, that reads `x` where it lies (a strided column slice of the fused q/k/v
//! projection), and the backward is the same kernel: the rotation's transpose is the
//! rotation by the opposite angle, `sin` negated.
//!
//! The products are taken in f32 whatever the compute type, rounded once to it: transformers
//! rounds `q cos`, `rotate_half(q) sin` and their sum each in bf16; this is as close to the
//! f32 CPU engine as the output type allows.
//!
//! Written by hand because burn 0.22 has no rotary kernel and no custom-backward op other
//! than a backend extension with `Autodiff` (burn-backend-extension's documentation): the
//! kernel runs on the cubecl backend, is one opaque operation under fusion, and under
//! autodiff records a backward step that launches it again with the sign flipped.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use kernels::rope_kernel;

/// The kernel, apart: cubecl's prelude has a `Tensor` of its own.
mod kernels {
    use cubecl::prelude::*;

    /// One unit per pair of an output row's columns, `d` and `d + half` of a head (`d <
    /// half`): it reads the pair from `x` (any strided layout) and the pair's angle from the
    /// tables `cos`, `sin` `[tokens, half]`, and writes the rotated pair into `out`
    /// (`[tokens, heads * head_dim]`, unit column stride): the CPU engine's `Rope::apply`,
    /// in its order of operations.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kernel<F: Float>(
        x: &Tensor<F>,
        cos: &Tensor<f32>,
        sin: &Tensor<f32>,
        out: &mut Tensor<F>,
        sign: f32,
        #[comptime] head_dim: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let half = head_dim / 2;
        let pairs = out.shape(1) / 2;
        if ABSOLUTE_POS >= out.shape(0) * pairs {
            terminate!();
        }
        let n = ABSOLUTE_POS / pairs;
        let r = ABSOLUTE_POS % pairs;
        let d = r % half;
        let first = (r / half) * head_dim + d;
        let second = first + half;
        let row = n * x.stride(0);
        let x1 = f32::cast_from(x[row + first * x.stride(1)]);
        let x2 = f32::cast_from(x[row + second * x.stride(1)]);
        let c = cos[n * cos.stride(0) + d * cos.stride(1)];
        let s = sign * sin[n * sin.stride(0) + d * sin.stride(1)];
        let at = n * out.stride(0);
        out[at + first] = F::cast_from(x1 * c - x2 * s);
        out[at + second] = F::cast_from(x2 * c + x1 * s);
    }
}

/// The kernel as an operation of burn's backends: the cubecl backend runs it, fusion keeps it
/// as one operation of the stream, autodiff records its backward.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait RotaryEmbedding: Backend {
    /// `x` `[tokens, heads * head_dim]` (f32, f16 or bf16, any layout) rotated by its
    /// tokens' angles (`sign` -1: by the opposite angles), from `llama::rope_tables`' f32
    /// tables `[tokens, head_dim / 2]`; a new tensor in `x`'s type.
    #[fusion(dtype = x, shape = x)]
    fn rotate(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        head_dim: u32,
        sign: f32,
    ) -> FloatTensor<Self>;
}

impl RotaryEmbedding for CubeBackend {
    fn rotate(
        x: CubeTensor,
        cos: CubeTensor,
        sin: CubeTensor,
        head_dim: u32,
        sign: f32,
    ) -> CubeTensor {
        let [tokens, width] = x.meta.shape.dims::<2>();
        let half = head_dim as usize / 2;
        for table in [&cos, &sin] {
            assert_eq!(table.dtype, DType::F32, "RoPE's tables are f32");
            assert_eq!(
                table.meta.shape.dims::<2>(),
                [tokens, half],
                "a table row per token"
            );
        }
        assert_eq!(width % (2 * half), 0, "whole heads of {head_dim}");
        let dtype = x.dtype;
        let out = empty_device_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::new([tokens, width]),
            dtype,
        );
        let units = tokens * width / 2;
        let dim = CubeDim::new(&x.client, units);
        let count = calculate_cube_count_elemwise(&x.client, units, dim);
        rope_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            sign,
            head_dim as usize,
            dtype_to_storage_type(dtype),
        );
        out
    }
}

/// The backward step: the gradient of `x` is the rotation of the output's gradient with the
/// sign flipped (the tables are constants).
#[derive(Debug)]
struct RotateBackward;

impl<B: RotaryEmbedding> Backward<B, 1> for RotateBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, u32, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin, head_dim, sign) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::rotate(grad, cos, sin, head_dim, -sign)
        });
    }
}

impl<B: RotaryEmbedding, C: CheckpointStrategy> RotaryEmbedding for Autodiff<B, C> {
    fn rotate(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        head_dim: u32,
        sign: f32,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        let (x, node) = x.into_parts();
        match RotateBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rotate(x, cos.clone(), sin.clone(), head_dim, sign);
                prep.finish((cos, sin, head_dim, sign), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotate(x, cos, sin, head_dim, sign)),
        }
    }
}

/// RoPE of `x` `[tokens, heads * head_dim]` with `llama::rope_tables`' f32 `cos` and `sin`
/// `[tokens, head_dim / 2]`: `[tokens, heads * head_dim]`, in `x`'s type, differentiable in
/// `x`.
pub fn rope(x: Tensor<2>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<2> {
    let head_dim = u32::try_from(2 * cos.dims()[1]).expect("a head dimension fits u32");
    Tensor::from_dispatch(Dispatch::rotate(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        head_dim,
        1.0,
    ))
}
