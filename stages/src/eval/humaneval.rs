//! HumanEval as bigcode-evaluation-harness scores it: completions cut at the stop words,
//! program = prompt + completion + test + `check(entry_point)`, the unbiased pass@k
//! estimator of Chen et al. (2021), and the paper's diversity count.

use std::collections::HashSet;

/// bigcode's stop words for HumanEval (EOS always stops too).
pub const STOP: &[&str] = &["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"];

/// The completion up to the first stop word.
pub fn cut(completion: &str) -> &str {
    let end = STOP
        .iter()
        .filter_map(|s| completion.find(s))
        .min()
        .unwrap_or(completion.len());
    &completion[..end]
}

/// The program the sandbox runs, shaped as the reference's: prompt + completion + test +
/// `check(entry_point)`. The sandbox appends its own last line (printing the run's token,
/// see [`super::sandbox`]), so that passing means `check` returned.
pub fn program(prompt: &str, completion: &str, test: &str, entry_point: &str) -> String {
    format!("{prompt}{completion}\n{test}\ncheck({entry_point})\n")
}

/// Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed as
/// the numerically stable product of bigcode's `estimate_pass_at_k`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    let mut prod = 1.0f64;
    for i in (n - c + 1)..=n {
        prod *= 1.0 - k as f64 / i as f64;
    }
    1.0 - prod
}

/// Distinct completions among a problem's samples: all, passed, failed.
pub fn diversity(samples: &[(&str, bool)]) -> (usize, usize, usize) {
    let all: HashSet<&str> = samples.iter().map(|s| s.0).collect();
    let passed: HashSet<&str> = samples.iter().filter(|s| s.1).map(|s| s.0).collect();
    let failed: HashSet<&str> = samples.iter().filter(|s| !s.1).map(|s| s.0).collect();
    (all.len(), passed.len(), failed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C(a, b) as f64 by the multiplicative formula (the reference definition).
    fn choose(a: usize, b: usize) -> f64 {
        if b > a {
            return 0.0;
        }
        (0..b).fold(1.0, |acc, i| acc * (a - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn pass_at_k_equals_the_binomial_formula() {
        // Hand-computed: n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        // pass@1 is the fraction correct.
        assert!((pass_at_k(50, 7, 1) - 7.0 / 50.0).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 0, 3), 0.0);
        assert_eq!(pass_at_k(10, 8, 3), 1.0);
        for (n, c, k) in [(20, 3, 5), (50, 10, 10), (256, 40, 100), (7, 1, 7)] {
            let want = 1.0 - choose(n - c, k) / choose(n, k);
            assert!((pass_at_k(n, c, k) - want).abs() < 1e-9, "{n} {c} {k}");
        }
    }

    #[test]
    fn completions_are_cut_at_the_first_stop_word() {
        assert_eq!(cut("    return x\n\ndef other():\n"), "    return x\n");
        assert_eq!(cut("    return 1\nif __name__"), "    return 1");
        assert_eq!(cut("    return 2"), "    return 2");
        assert_eq!(
            diversity(&[("a", true), ("a", true), ("b", false), ("c", false)]),
            (3, 1, 2)
        );
    }
}
