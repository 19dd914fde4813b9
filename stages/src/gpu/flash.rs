//! Fused attention kernels for training: flash attention's forward pass (each query's
//! output and the log-sum-exp of its scores, in one kernel) and its backward pass (the
//! probabilities recomputed from that log-sum-exp, in two kernels: one over queries for
//! their gradients, one over keys for the keys' and values'), with the causal, window and
//! per-document masks decided in the kernel from positions and document ids. Nothing of
//! size `t x t` exists at any time: a layer's attention holds its inputs, its output and
//! two floats per query.
//!
//! Written as cubecl kernels by hand because burn 0.22's own flash kernels are forward-only
//! and return no log-sum-exp (under autodiff burn materializes `t x t`, cubek #272), and
//! cubek-attention 0.3's backward is a causal-only scaffold without document masks or
//! grouped key/value heads. These kernels read grouped key/value heads in place (no copy to
//! the query heads) and any strided layout (the trainer's `[tokens, heads * head_dim]`
//! viewed as `[rows, heads, t, head_dim]`), in f32 whatever the compute type.
//!
//! One unit works one row (a query, or a key in the key/value pass) with its head's
//! vectors in registers; a cube of 64 such rows reads the rows they all go over (keys and
//! values, or queries and their output gradients) through shared memory, a tile at a time,
//! so each is read from device memory once per cube, not once per row. It is a
//! memory-linear fused kernel, not tensor-core tiles (BENCHMARKS.md, "Fused attention
//! kernels", says what was measured where). They run through burn's backend extension
//! (`#[backend_extension]`): under fusion they are one opaque operation in the stream, like
//! a matmul; under autodiff [`attention`] is one operation whose backward step launches the
//! two backward kernels, so a model attends through it as through any tensor operation.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, TensorMetadata, backend_extension,
};
use burn::tensor::{DType, Shape, Slice, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use kernels::{dkv_kernel, dq_kernel, forward_kernel};

/// The kernels, apart: cubecl's prelude has a `Tensor` of its own.
mod kernels {
    use cubecl::prelude::*;

    /// Whether query `i` sees key `j <= i`: within the window (`window` is the sequence length
    /// when the layer has none) and in the same document (`0` is padding, which sees only
    /// itself; a batch without documents passes ones). The CPU engine's rule,
    /// `cpu::attention::allowed`.
    #[cube]
    fn sees(i: usize, j: usize, window: usize, doc_i: f32, doc_j: f32) -> bool {
        i - j < window && (i == j || (doc_i != 0.0 && doc_i == doc_j))
    }

    /// The head (`batch row * heads + head`) whose rows this cube works, `CUBE_DIM` rows of
    /// `t` a cube; past the last head for the cubes that round the grid up.
    #[cube]
    fn cube_head(t: usize) -> usize {
        CUBE_POS / t.div_ceil(CUBE_DIM as usize)
    }

    /// The first of the rows this cube works.
    #[cube]
    fn cube_first(t: usize) -> usize {
        (CUBE_POS % t.div_ceil(CUBE_DIM as usize)) * CUBE_DIM as usize
    }

    /// The earliest key a query at `first` or later sees: `window - 1` positions back.
    #[cube]
    fn window_start(first: usize, window: usize) -> usize {
        let mut start = 0;
        if first >= window {
            start = first + 1 - window;
        }
        start
    }

    /// The smaller of `a` and `b`.
    #[cube]
    fn least(a: usize, b: usize) -> usize {
        let mut m = a;
        if b < a {
            m = b;
        }
        m
    }

    /// Copies `rows` consecutive rows from row `first` of one head of `x` (`[b, heads, t,
    /// head_dim]`, any strides; the head starts at `base`) into `tile`, row-major; rows past
    /// `t` are left as they are (no unit reads them). Every unit of the cube takes part, one
    /// element in `CUBE_DIM`, so neighbouring units read neighbouring elements.
    #[cube]
    fn load_rows(
        x: &Tensor<f32>,
        base: usize,
        first: usize,
        t: usize,
        tile: &mut Shared<[f32]>,
        #[comptime] rows: usize,
        #[comptime] head_dim: usize,
    ) {
        let mut e = UNIT_POS as usize;
        while e < rows * head_dim {
            let r = e / head_dim;
            if first + r < t {
                tile[e] = x[base + (first + r) * x.stride(2) + (e % head_dim) * x.stride(3)];
            }
            e += CUBE_DIM as usize;
        }
    }

    /// Copies `rows` document ids from position `first` of batch row `b` into `tile`.
    #[cube]
    fn load_docs(
        docs: &Tensor<f32>,
        b: usize,
        first: usize,
        t: usize,
        tile: &mut Shared<[f32]>,
        #[comptime] rows: usize,
    ) {
        let mut r = UNIT_POS as usize;
        while r < rows {
            if first + r < t {
                tile[r] = docs[b * docs.stride(0) + (first + r) * docs.stride(1)];
            }
            r += CUBE_DIM as usize;
        }
    }

    /// `CUBE_DIM` consecutive queries of one head per cube, one query per unit: `out =
    /// softmax(q k^T * scale) v` over the keys it sees, in one pass with a running maximum
    /// (flash attention), and `lse = max + ln(sum)`. Keys, values and their document ids
    /// come through shared memory, `tile` keys at a time, read from device memory once per
    /// cube instead of once per query.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn forward_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        docs: &Tensor<f32>,
        out: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
        scale: f32,
        window: u32,
        #[comptime] head_dim: usize,
        #[comptime] tile: usize,
    ) {
        let heads = q.shape(1);
        let t = q.shape(2);
        let row = cube_head(t);
        // Whole cubes past the end (the grid is rounded up): uniform, so no barrier waits.
        if row >= q.shape(0) * heads {
            terminate!();
        }
        let first = cube_first(t);
        let i = first + UNIT_POS as usize;
        let valid = i < t;
        let h = row % heads;
        let b = row / heads;
        let kv = h / (heads / k.shape(1));
        let window = window as usize;
        let k0 = b * k.stride(0) + kv * k.stride(1);
        let v0 = b * v.stride(0) + kv * v.stride(1);

        let mut qi = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        let mut doc_i = f32::new(0.0);
        for d in 0..head_dim {
            qi[d] = 0.0;
            acc[d] = 0.0;
        }
        if valid {
            let q0 = b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
            for d in 0..head_dim {
                qi[d] = q[q0 + d * q.stride(3)] * scale;
            }
            doc_i = docs[b * docs.stride(0) + i * docs.stride(1)];
        }
        let mut keys = Shared::<[f32]>::new_slice(tile * head_dim);
        let mut values = Shared::<[f32]>::new_slice(tile * head_dim);
        let mut key_docs = Shared::<[f32]>::new_slice(tile);
        // WGSL has no -inf literal (burn's CTC kernel says the same): a floor below any score.
        let mut max = f32::new(-3.0e38);
        let mut sum = f32::new(0.0);
        // The keys some query of the cube sees: from the first query's window to the last.
        let mut j0 = window_start(first, window);
        let end = least(first + CUBE_DIM as usize, t);
        while j0 < end {
            load_rows(k, k0, j0, t, &mut keys, tile, head_dim);
            load_rows(v, v0, j0, t, &mut values, tile, head_dim);
            load_docs(docs, b, j0, t, &mut key_docs, tile);
            sync_cube();
            if valid {
                for r in 0..tile {
                    let j = j0 + r;
                    if j <= i && sees(i, j, window, doc_i, key_docs[r]) {
                        let mut s = f32::new(0.0);
                        for d in 0..head_dim {
                            s += qi[d] * keys[r * head_dim + d];
                        }
                        if s > max {
                            let rescale = (max - s).exp();
                            sum *= rescale;
                            for d in 0..head_dim {
                                acc[d] *= rescale;
                            }
                            max = s;
                        }
                        let p = (s - max).exp();
                        sum += p;
                        for d in 0..head_dim {
                            acc[d] += p * values[r * head_dim + d];
                        }
                    }
                }
            }
            sync_cube();
            j0 += tile;
        }
        if valid {
            let o0 = (row * t + i) * head_dim;
            for d in 0..head_dim {
                out[o0 + d] = acc[d] / sum;
            }
            lse[row * t + i] = max + sum.ln();
        }
    }

    /// `CUBE_DIM` consecutive queries of one head per cube, one query per unit: `dq = scale *
    /// sum_j p_ij (dp_ij - delta_i) k_j`, with `p_ij = exp(s_ij - lse_i)` recomputed and
    /// `dp_ij = d_out_i . v_j`. `stats` `[b, h, t, 2]` holds each query's `(lse, delta)`,
    /// `delta = rowsum(d_out * out)`. Keys and values come through shared memory as in the
    /// forward kernel.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn dq_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        d_out: &Tensor<f32>,
        stats: &Tensor<f32>,
        docs: &Tensor<f32>,
        dq: &mut Tensor<f32>,
        scale: f32,
        window: u32,
        #[comptime] head_dim: usize,
        #[comptime] tile: usize,
    ) {
        let heads = q.shape(1);
        let t = q.shape(2);
        let row = cube_head(t);
        if row >= q.shape(0) * heads {
            terminate!();
        }
        let first = cube_first(t);
        let i = first + UNIT_POS as usize;
        let valid = i < t;
        let h = row % heads;
        let b = row / heads;
        let kv = h / (heads / k.shape(1));
        let window = window as usize;
        let k0 = b * k.stride(0) + kv * k.stride(1);
        let v0 = b * v.stride(0) + kv * v.stride(1);

        let mut qi = Array::<f32>::new(head_dim);
        let mut doi = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        let mut doc_i = f32::new(0.0);
        let mut lse_i = f32::new(0.0);
        let mut delta_i = f32::new(0.0);
        for d in 0..head_dim {
            qi[d] = 0.0;
            doi[d] = 0.0;
            acc[d] = 0.0;
        }
        if valid {
            let q0 = b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
            let o0 = b * d_out.stride(0) + h * d_out.stride(1) + i * d_out.stride(2);
            for d in 0..head_dim {
                qi[d] = q[q0 + d * q.stride(3)] * scale;
                doi[d] = d_out[o0 + d * d_out.stride(3)];
            }
            doc_i = docs[b * docs.stride(0) + i * docs.stride(1)];
            let s0 = b * stats.stride(0) + h * stats.stride(1) + i * stats.stride(2);
            lse_i = stats[s0];
            delta_i = stats[s0 + stats.stride(3)];
        }
        let mut keys = Shared::<[f32]>::new_slice(tile * head_dim);
        let mut values = Shared::<[f32]>::new_slice(tile * head_dim);
        let mut key_docs = Shared::<[f32]>::new_slice(tile);
        let mut j0 = window_start(first, window);
        let end = least(first + CUBE_DIM as usize, t);
        while j0 < end {
            load_rows(k, k0, j0, t, &mut keys, tile, head_dim);
            load_rows(v, v0, j0, t, &mut values, tile, head_dim);
            load_docs(docs, b, j0, t, &mut key_docs, tile);
            sync_cube();
            if valid {
                for r in 0..tile {
                    let j = j0 + r;
                    if j <= i && sees(i, j, window, doc_i, key_docs[r]) {
                        let mut s = f32::new(0.0);
                        let mut dp = f32::new(0.0);
                        for d in 0..head_dim {
                            s += qi[d] * keys[r * head_dim + d];
                            dp += doi[d] * values[r * head_dim + d];
                        }
                        let ds = (s - lse_i).exp() * (dp - delta_i);
                        for d in 0..head_dim {
                            acc[d] += ds * keys[r * head_dim + d];
                        }
                    }
                }
            }
            sync_cube();
            j0 += tile;
        }
        if valid {
            let o0 = (row * t + i) * head_dim;
            for d in 0..head_dim {
                dq[o0 + d] = acc[d] * scale;
            }
        }
    }

    /// `CUBE_DIM` consecutive keys of one key/value head per cube, one key per unit, over the
    /// queries of every query head of its group that see it: `dv_j = sum p_ij d_out_i`,
    /// `dk_j = scale * sum p_ij (dp_ij - delta_i) q_i`, written side by side as `dkv[.., j,
    /// ..] = [dk_j, dv_j]` (one output: wgpu allows a kernel few storage buffers). Queries,
    /// their output gradients, stats and document ids come through shared memory, `tile`
    /// queries at a time.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn dkv_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        d_out: &Tensor<f32>,
        stats: &Tensor<f32>,
        docs: &Tensor<f32>,
        dkv: &mut Tensor<f32>,
        scale: f32,
        window: u32,
        #[comptime] head_dim: usize,
        #[comptime] tile: usize,
    ) {
        let heads = q.shape(1);
        let kv_heads = k.shape(1);
        let t = k.shape(2);
        let row = cube_head(t);
        if row >= k.shape(0) * kv_heads {
            terminate!();
        }
        let first = cube_first(t);
        let j = first + UNIT_POS as usize;
        let valid = j < t;
        let kv = row % kv_heads;
        let b = row / kv_heads;
        let group = heads / kv_heads;
        let window = window as usize;

        let mut kr = Array::<f32>::new(head_dim);
        let mut vr = Array::<f32>::new(head_dim);
        let mut dk = Array::<f32>::new(head_dim);
        let mut dv = Array::<f32>::new(head_dim);
        let mut doc_j = f32::new(0.0);
        for d in 0..head_dim {
            kr[d] = 0.0;
            vr[d] = 0.0;
            dk[d] = 0.0;
            dv[d] = 0.0;
        }
        if valid {
            let kj = b * k.stride(0) + kv * k.stride(1) + j * k.stride(2);
            let vj = b * v.stride(0) + kv * v.stride(1) + j * v.stride(2);
            for d in 0..head_dim {
                kr[d] = k[kj + d * k.stride(3)] * scale;
                vr[d] = v[vj + d * v.stride(3)];
            }
            doc_j = docs[b * docs.stride(0) + j * docs.stride(1)];
        }
        let mut queries = Shared::<[f32]>::new_slice(tile * head_dim);
        let mut grads = Shared::<[f32]>::new_slice(tile * head_dim);
        let mut query_stats = Shared::<[f32]>::new_slice(tile * 2);
        let mut query_docs = Shared::<[f32]>::new_slice(tile);
        // The queries that see some key of the cube: from its first key to the last key's
        // window.
        let last = least(first + CUBE_DIM as usize, t);
        let end = least(last - 1 + window, t);
        for g in 0..group {
            let h = kv * group + g;
            let q0 = b * q.stride(0) + h * q.stride(1);
            let o0 = b * d_out.stride(0) + h * d_out.stride(1);
            let s0 = b * stats.stride(0) + h * stats.stride(1);
            let mut i0 = first;
            while i0 < end {
                load_rows(q, q0, i0, t, &mut queries, tile, head_dim);
                load_rows(d_out, o0, i0, t, &mut grads, tile, head_dim);
                load_rows(stats, s0, i0, t, &mut query_stats, tile, 2usize);
                load_docs(docs, b, i0, t, &mut query_docs, tile);
                sync_cube();
                if valid {
                    for r in 0..tile {
                        let i = i0 + r;
                        if j <= i && i < t && sees(i, j, window, query_docs[r], doc_j) {
                            let mut s = f32::new(0.0);
                            let mut dp = f32::new(0.0);
                            for d in 0..head_dim {
                                s += queries[r * head_dim + d] * kr[d];
                                dp += grads[r * head_dim + d] * vr[d];
                            }
                            let p = (s - query_stats[r * 2]).exp();
                            let ds = p * (dp - query_stats[r * 2 + 1]);
                            for d in 0..head_dim {
                                dv[d] += p * grads[r * head_dim + d];
                                dk[d] += ds * queries[r * head_dim + d];
                            }
                        }
                    }
                }
                sync_cube();
                i0 += tile;
            }
        }
        if valid {
            let o0 = (row * t + j) * head_dim * 2;
            for d in 0..head_dim {
                dkv[o0 + d] = dk[d] * scale;
                dkv[o0 + head_dim + d] = dv[d];
            }
        }
    }
}

/// The kernels as an operation of burn's backends: the cubecl backend runs them, under
/// fusion each is one operation whose outputs' shapes are known before it runs, and under
/// autodiff the forward records [`FlashBackward`].
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait FlashAttention: Backend {
    /// `(out [b, h, t, hd], lse [b, h, t, 1])` of q `[b, h, t, hd]`, k and v
    /// `[b, kv_heads, t, hd]`, documents `[b, t]`.
    #[fusion(meta = forward_specs)]
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        docs: FloatTensor<Self>,
        scale: f32,
        window: u32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq [b, h, t, hd], dkv [b, kv_heads, t, 2 hd])` from `stats` `[b, h, t, 2]`, each
    /// query's `(lse, delta)`.
    #[fusion(meta = backward_specs)]
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        docs: FloatTensor<Self>,
        scale: f32,
        window: u32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

fn forward_specs(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _docs: &TensorSpec,
    _scale: &f32,
    _window: &u32,
) -> (TensorSpec, TensorSpec) {
    let mut lse = q.clone();
    lse.shape[3] = 1;
    (q.clone(), lse)
}

#[allow(clippy::too_many_arguments)]
fn backward_specs(
    q: &TensorSpec,
    k: &TensorSpec,
    _v: &TensorSpec,
    _d_out: &TensorSpec,
    _stats: &TensorSpec,
    _docs: &TensorSpec,
    _scale: &f32,
    _window: &u32,
) -> (TensorSpec, TensorSpec) {
    let mut dkv = k.clone();
    dkv.shape[3] *= 2;
    (q.clone(), dkv)
}

/// An f32 tensor of this shape on `like`'s device, to be written whole by a kernel.
fn empty_like(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

/// Units (queries or keys) per cube: a cube shares each tile of rows it reads among them.
const BLOCK: usize = 64;

/// Rows (keys, or queries in the key/value pass) per shared-memory tile: a kernel's two
/// tiles of `head_dim` f32 take 12 KiB, its few floats a row beside them less than 1 KiB
/// more, within the 16 KiB of workgroup memory every wgpu device has.
fn tile_rows(head_dim: usize) -> usize {
    (12 * 1024 / (2 * 4 * head_dim)).clamp(1, BLOCK)
}

/// The launch grid: one cube per [`BLOCK`] rows of each of `heads` heads of `t` rows.
fn grid(like: &CubeTensor, heads: usize, t: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_1d(BLOCK as u32);
    let units = heads * t.div_ceil(BLOCK) * BLOCK;
    (calculate_cube_count_elemwise(&like.client, units, dim), dim)
}

impl FlashAttention for CubeBackend {
    fn flash_forward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        docs: CubeTensor,
        scale: f32,
        window: u32,
    ) -> (CubeTensor, CubeTensor) {
        let [b, h, t, hd] = q.meta.shape.dims();
        let out = empty_like(&q, Shape::new([b, h, t, hd]));
        let lse = empty_like(&q, Shape::new([b, h, t, 1]));
        let (count, dim) = grid(&q, b * h, t);
        forward_kernel::launch(
            &q.client.clone(),
            count,
            dim,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            docs.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale,
            window,
            hd,
            tile_rows(hd),
        );
        (out, lse)
    }

    fn flash_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        d_out: CubeTensor,
        stats: CubeTensor,
        docs: CubeTensor,
        scale: f32,
        window: u32,
    ) -> (CubeTensor, CubeTensor) {
        let [b, h, t, hd] = q.meta.shape.dims();
        let kv_heads = k.meta.shape[1];
        let client = q.client.clone();
        let dq = empty_like(&q, Shape::new([b, h, t, hd]));
        let dkv = empty_like(&q, Shape::new([b, kv_heads, t, 2 * hd]));
        let (count, dim) = grid(&q, b * h, t);
        dq_kernel::launch(
            &client,
            count,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            d_out.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            docs.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            scale,
            window,
            hd,
            tile_rows(hd),
        );
        let (count, dim) = grid(&q, b * kv_heads, t);
        dkv_kernel::launch(
            &client,
            count,
            dim,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            d_out.into_tensor_arg(),
            stats.into_tensor_arg(),
            docs.into_tensor_arg(),
            dkv.clone().into_tensor_arg(),
            scale,
            window,
            hd,
            tile_rows(hd),
        );
        (dq, dkv)
    }
}

/// What the backward step keeps of the forward: q, k, v, the output and the log-sum-exp
/// (nothing `t x t`), the document ids, the scale and the window.
type FlashState<B> = (
    [FloatTensor<B>; 3],
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    f32,
    u32,
);

/// Attention's backward step: each query's `delta = rowsum(dO * O)` beside its log-sum-exp,
/// then the dq kernel and the dk/dv kernel, whose one output is split into the two.
#[derive(Debug)]
struct FlashBackward;

impl<B: FlashAttention> Backward<B, 3> for FlashBackward {
    type State = FlashState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([q, k, v], out, lse, docs, scale, window) = ops.state;
        let d_out = grads.consume::<B>(&ops.node);
        let [b, kv_heads, t, hd] = k.shape().dims();
        let delta = B::float_sum_dim(B::float_mul(d_out.clone(), out), 3);
        let stats = B::float_cat(vec![lse, delta], 3);
        let (dq, dkv) = B::flash_backward(q, k, v, d_out, stats, docs, scale, window);
        let half =
            |at: usize| -> [Slice; 4] { [0..b, 0..kv_heads, 0..t, at..at + hd].map(Slice::from) };
        let [pq, pk, pv] = ops.parents;
        let grads_of = [
            (pq, dq),
            (pk, B::float_slice(dkv.clone(), &half(0))),
            (pv, B::float_slice(dkv, &half(hd))),
        ];
        for (parent, grad) in grads_of {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FlashAttention, C: CheckpointStrategy> FlashAttention for Autodiff<B, C> {
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        docs: FloatTensor<Self>,
        scale: f32,
        window: u32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let ((q, qn), (k, kn), (v, vn)) = (q.into_parts(), k.into_parts(), v.into_parts());
        let docs = docs.into_primitive();
        let (out, lse) = match FlashBackward
            .prepare::<C>([qn, kn, vn])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) =
                    B::flash_forward(q.clone(), k.clone(), v.clone(), docs.clone(), scale, window);
                let state = ([q, k, v], out.clone(), lse.clone(), docs, scale, window);
                (prep.finish(state, out), lse)
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::flash_forward(q, k, v, docs, scale, window);
                (prep.finish(out), lse)
            }
        };
        // The log-sum-exp is the backward step's, not differentiated: a leaf of its own.
        (out, Self::from_inner(lse))
    }

    /// Not differentiated itself (it is the backward step's): on the inner backend.
    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        docs: FloatTensor<Self>,
        scale: f32,
        window: u32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inner = |x: FloatTensor<Self>| x.into_primitive();
        let (dq, dkv) = B::flash_backward(
            inner(q),
            inner(k),
            inner(v),
            inner(d_out),
            inner(stats),
            inner(docs),
            scale,
            window,
        );
        (Self::from_inner(dq), Self::from_inner(dkv))
    }
}

/// The window a kernel takes: the layer's, or the sequence length (every earlier key).
fn window_of(window: Option<usize>, t: usize) -> u32 {
    u32::try_from(window.unwrap_or(t).min(t)).expect("a sequence length fits u32")
}

/// Attention's output `[b, h, t, hd]` from q `[b, h, t, hd]`, k and v `[b, kv_heads, t,
/// hd]` (f32, any layout) and the rows' document ids as f32 `[b, t]` (ones for a batch
/// without documents): causal, within `window`, within documents. Differentiable in q, k
/// and v on an autodiff device, by the recomputing backward kernels.
pub fn attention(
    [q, k, v]: [Tensor<4>; 3],
    docs: Tensor<2>,
    scale: f32,
    window: Option<usize>,
) -> Tensor<4> {
    let window = window_of(window, q.dims()[2]);
    let (out, _lse) = Dispatch::flash_forward(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        docs.into_dispatch(),
        scale,
        window,
    );
    Tensor::from_dispatch(out)
}
