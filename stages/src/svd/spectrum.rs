//! Singular values (faer) and what the paper reads from them: the rank needed to explain a
//! share of the spectrum, the effective rank, the numerical rank.

use faer::{MatRef, Par};

/// Singular values of a row-major `rows x cols` f32 matrix, in non-increasing order, on
/// `threads` threads (1 = sequential, for when matrices already run in parallel).
pub fn singular_values(data: &[f32], rows: usize, cols: usize, threads: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols, "matrix buffer size");
    let par = match std::num::NonZeroUsize::new(threads) {
        Some(n) if n.get() > 1 => Par::Rayon(n),
        _ => Par::Seq,
    };
    faer::set_global_parallelism(par);
    let m = MatRef::from_row_major_slice(data, rows, cols);
    // A non-converging SVD (NaN or infinite input) yields NaNs rather than a panic; the
    // caller reports non-finite weights by name before getting here.
    m.singular_values()
        .unwrap_or_else(|_| vec![f32::NAN; rows.min(cols)])
}

/// The smallest k whose top-k weights (sigma^2 when `squared`, else sigma) reach
/// `fraction` of the total: the paper's "rank needed to explain 90% of the variance".
/// 0 for a zero matrix.
pub fn rank_at(sv: &[f32], fraction: f64, squared: bool) -> usize {
    let w = |s: f32| {
        if squared {
            (s as f64).powi(2)
        } else {
            s as f64
        }
    };
    let total: f64 = sv.iter().map(|&s| w(s)).sum();
    if total <= 0.0 {
        return 0;
    }
    let mut acc = 0.0;
    for (i, &s) in sv.iter().enumerate() {
        acc += w(s);
        // A relative slack of 1e-12 keeps an exact boundary (e.g. 9 of 10 equal values at
        // 90%) from falling to the next rank by summation rounding.
        if acc >= fraction * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    sv.len()
}

/// Effective rank (Roy & Vetterli 2007): exp of the entropy of sigma / sum(sigma).
pub fn effective_rank(sv: &[f32]) -> f64 {
    let total: f64 = sv.iter().map(|&s| s as f64).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = sv
        .iter()
        .map(|&s| s as f64 / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

/// Singular values above numpy's `matrix_rank` tolerance: sigma_max * max(m, n) * eps(f32).
pub fn numerical_rank(sv: &[f32], rows: usize, cols: usize) -> usize {
    let max = sv.first().copied().unwrap_or(0.0);
    let tol = max * rows.max(cols) as f32 * f32::EPSILON;
    sv.iter().filter(|&&s| s > tol).count()
}

/// Frobenius norm from the singular values (sqrt of the sum of squares).
pub fn frobenius(sv: &[f32]) -> f64 {
    sv.iter().map(|&s| (s as f64).powi(2)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_at_is_exact_on_known_spectra() {
        // Ten equal values: 90% of the variance needs exactly 9.
        assert_eq!(rank_at(&[1.0; 10], 0.9, true), 9);
        // sigma^2 = 81, 9, 9, 1: 81/100 < 0.9, 90/100 reaches it.
        assert_eq!(rank_at(&[9.0, 3.0, 3.0, 1.0], 0.9, true), 2);
        // On sigma instead: 9/16, 12/16 = 0.75, 15/16 >= 0.9: 3.
        assert_eq!(rank_at(&[9.0, 3.0, 3.0, 1.0], 0.9, false), 3);
        assert_eq!(rank_at(&[0.0, 0.0], 0.9, true), 0);
        assert!((effective_rank(&[2.0, 2.0, 2.0, 2.0]) - 4.0).abs() < 1e-12);
        assert!((effective_rank(&[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert_eq!(numerical_rank(&[1.0, 0.5, 1e-9], 3, 3), 2);
    }

    #[test]
    fn singular_values_of_a_diagonal_matrix_are_its_sorted_entries() {
        let mut m = vec![0.0f32; 4 * 3];
        m[0] = 2.0;
        m[4] = -5.0;
        m[8] = 1.0;
        let sv = singular_values(&m, 4, 3, 1);
        for (a, b) in sv.iter().zip([5.0, 2.0, 1.0]) {
            assert!((a - b).abs() < 1e-5, "{sv:?}");
        }
    }
}
