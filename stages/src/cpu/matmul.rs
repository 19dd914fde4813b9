//! Matrix products on row-major f32 buffers through the `gemm` crate (the kernels burn's CPU
//! backend and faer use: AVX2/AVX-512 micro-kernels, threads over output blocks only, so the
//! result does not depend on scheduling).

use gemm::Parallelism;

/// A matrix inside a buffer: element (i, j) is at `off + i*rs + j*cs`.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub off: usize,
    pub rs: isize,
    pub cs: isize,
}

impl Layout {
    /// A contiguous row-major `rows x cols` matrix, read as is (`trans` false) or transposed.
    pub fn rows(cols: usize, trans: bool) -> Layout {
        if trans {
            Layout {
                off: 0,
                rs: 1,
                cs: cols as isize,
            }
        } else {
            Layout {
                off: 0,
                rs: cols as isize,
                cs: 1,
            }
        }
    }

    pub fn at(mut self, off: usize) -> Layout {
        self.off = off;
        self
    }

    /// The largest index an `m x n` matrix with this layout touches, plus one.
    fn extent(&self, m: usize, n: usize) -> usize {
        if m == 0 || n == 0 {
            return self.off;
        }
        self.off + (m - 1) * self.rs as usize + (n - 1) * self.cs as usize + 1
    }
}

/// `c = beta_c * c + alpha * a · b` with `a` m×k, `b` k×n, `c` m×n in the given layouts;
/// `accumulate` false overwrites `c` (it may hold garbage). Panics if a layout reaches past
/// its buffer (a bug, never input-dependent).
#[allow(clippy::too_many_arguments)]
pub fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    lc: Layout,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    alpha: f32,
    accumulate: bool,
    threads: usize,
) {
    assert!(lc.extent(m, n) <= c.len(), "gemm: c out of bounds");
    assert!(la.extent(m, k) <= a.len(), "gemm: a out of bounds");
    assert!(lb.extent(k, n) <= b.len(), "gemm: b out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[lc.off + i * lc.rs as usize + j * lc.cs as usize] = 0.0;
                }
            }
        }
        return;
    }
    let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the extents were checked against the buffers above; c does not alias a or b
    // (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(lc.off),
            lc.cs,
            lc.rs,
            accumulate,
            a.as_ptr().add(la.off),
            la.cs,
            la.rs,
            b.as_ptr().add(lb.off),
            lb.cs,
            lb.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// A Linear layer's products over `rows` tokens: weight `W[out, in]`, input `x[rows, in]`.
#[derive(Debug, Clone, Copy)]
pub struct Dense {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
    pub threads: usize,
}

impl Dense {
    /// `y[rows, out] (+)= x · W^T`.
    pub fn forward(&self, x: &[f32], w: &[f32], y: &mut [f32], accumulate: bool) {
        gemm_into(
            self.rows,
            self.out,
            self.inp,
            y,
            Layout::rows(self.out, false),
            x,
            Layout::rows(self.inp, false),
            w,
            Layout::rows(self.inp, true),
            1.0,
            accumulate,
            self.threads,
        );
    }

    /// `dx[rows, in] (+)= dy[rows, out] · W` (the input gradient).
    pub fn dx(&self, dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool) {
        gemm_into(
            self.rows,
            self.inp,
            self.out,
            dx,
            Layout::rows(self.inp, false),
            dy,
            Layout::rows(self.out, false),
            w,
            Layout::rows(self.inp, false),
            1.0,
            accumulate,
            self.threads,
        );
    }

    /// `dw[out, in] (+)= alpha * dy^T · x` (the weight gradient).
    pub fn dw(&self, dy: &[f32], x: &[f32], dw: &mut [f32], alpha: f32, accumulate: bool) {
        gemm_into(
            self.out,
            self.inp,
            self.rows,
            dw,
            Layout::rows(self.inp, false),
            dy,
            Layout::rows(self.out, true),
            x,
            Layout::rows(self.inp, false),
            alpha,
            accumulate,
            self.threads,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn linear_and_its_gradients_match_a_naive_product() {
        let (n, i, o) = (37, 19, 23);
        let x: Vec<f32> = (0..n * i)
            .map(|v| ((v * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w: Vec<f32> = (0..o * i)
            .map(|v| ((v * 5 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let mut wt = vec![0.0; i * o];
        for r in 0..o {
            for c in 0..i {
                wt[c * o + r] = w[r * i + c];
            }
        }
        let mut y = vec![f32::NAN; n * o];
        Dense {
            rows: n,
            inp: i,
            out: o,
            threads: 2,
        }
        .forward(&x, &w, &mut y, false);
        let want = naive(&x, &wt, n, i, o);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // dx = dy W, dw = dy^T x
        let dy = want.clone();
        let mut dx = vec![0.0; n * i];
        Dense {
            rows: n,
            inp: i,
            out: o,
            threads: 1,
        }
        .dx(&dy, &w, &mut dx, false);
        let want_dx = naive(&dy, &w, n, o, i);
        for (a, b) in dx.iter().zip(&want_dx) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        let mut dyt = vec![0.0; o * n];
        for r in 0..n {
            for c in 0..o {
                dyt[c * n + r] = dy[r * o + c];
            }
        }
        let mut dw = vec![1.0; o * i];
        Dense {
            rows: n,
            inp: i,
            out: o,
            threads: 2,
        }
        .dw(&dy, &x, &mut dw, 1.0, true);
        let want_dw = naive(&dyt, &x, o, n, i);
        for (a, b) in dw.iter().zip(&want_dw) {
            assert!((a - (b + 1.0)).abs() < 1e-3, "{a} vs {b}+1");
        }
    }
}
