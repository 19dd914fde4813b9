//! Means and 95% confidence intervals for the report: a bootstrap over eval items within a
//! run, and a two-level (hierarchical) bootstrap over seeds and items across replicates.
//!
//! # The method, and why
//!
//! A run's metric is a mean over eval items (GSM8K problems, HumanEval problems, multiple
//! choice questions), so its noise is the noise of which items were drawn. Within one run the
//! interval is the **percentile bootstrap** over items (scipy's `bootstrap(...,
//! method="percentile")`): resample the items with replacement, recompute the metric, take
//! the 2.5% and 97.5% quantiles (numpy's linear interpolation) of [`REPLICATES`] resamples.
//! Metrics that average over strata (the forgetting score is the plain mean of three styles'
//! accuracies) are resampled **within each stratum**, as scipy does with one sample per
//! stratum (`paired=False`), so every resample keeps the styles' sizes.
//!
//! Across seed replicates the interval is a **two-level bootstrap**: each resample draws the
//! items once (the replicates of one study are scored on the same items, so the same draw is
//! applied to every seed), then draws the seeds with replacement, and averages the drawn
//! seeds' metrics on the drawn items. The seed level is rescaled by sqrt(S/(S-1)) around the
//! mean over all seeds, which makes the bootstrap variance of the seed mean the unbiased
//! s^2/S instead of the plug-in (S-1)/S s^2/S: with 2 or 3 seeds the plain bootstrap would be
//! too narrow by a factor sqrt(2) or sqrt(1.5). We chose this over a t-interval over seed
//! means because with 2 seeds a t-interval (t = 12.7 on one degree of freedom) rests on one
//! difference and is either absurdly wide or, when two seeds happen to agree, zero wide
//! while the item noise is not; the bootstrap keeps the item noise in every resample, so two
//! agreeing seeds still get the item-level width. It remains optimistic with few seeds (a
//! normal-quantile interval for the seed spread, not a t one): read 2-seed intervals as such.
//!
//! Item draws are a pure function of (seed, resample, stratum name, stratum size), so two
//! points scored on the same items get the **same** item resamples: differences between
//! methods (the findings) are paired over items, which removes item difficulty from the
//! difference as a paired test does; seed draws are independent between points.
//!
//! Binomial items (every item 0 or 1) near p = 0 or 1 (fewer than 5 successes or 5
//! failures) get at least the **Wilson score interval**: the percentile bootstrap collapses to
//! a point at p = 0 or 1 (every resample of 150 wrong answers is 0), which would claim
//! certainty that 150 items cannot give; Wilson's interval at 0/150 is [0, 0.025]. The final
//! interval there is the hull of the bootstrap's and Wilson's.
//!
//! Everything is deterministic: the generator is the project's SplitMix64
//! ([`crate::data::rng::Rng`]), seeded from the report, so the same inputs give the same bits.

use crate::data::rng::Rng;

/// Bootstrap resamples behind every interval the report draws: the 2.5% quantile then rests
/// on 50 resamples, enough for two decimals on 150 items at a few milliseconds per point.
pub const REPLICATES: usize = 2000;

/// The seed the report's resampling starts from (fixed: the report is a pure function).
pub const SEED: u64 = 0x005E_EDC1;

/// z for a two-sided 95% interval (Wilson).
const Z: f64 = 1.959_963_984_540_054;

/// Below this many successes (or failures) a binomial mean's interval is floored by Wilson's.
const FEW: f64 = 5.0;

/// One run's per-item scores for a metric, grouped into strata; the metric is the mean over
/// strata of each stratum's mean (one stratum: the plain mean). Items within a stratum are in
/// a canonical order (sorted by item id), so runs on the same items line up.
#[derive(Debug, Clone, PartialEq)]
pub struct Items {
    /// (stratum name, scores).
    pub strata: Vec<(String, Vec<f64>)>,
}

impl Items {
    /// Items of one stratum.
    pub fn flat(name: &str, scores: Vec<f64>) -> Items {
        Items {
            strata: vec![(name.to_string(), scores)],
        }
    }

    /// The metric on every item: the mean of the strata means.
    pub fn statistic(&self) -> f64 {
        let means: Vec<f64> = self.strata.iter().map(|(_, v)| mean(v)).collect();
        mean(&means)
    }

    /// Items across all strata.
    pub fn len(&self) -> usize {
        self.strata.iter().map(|(_, v)| v.len()).sum()
    }

    /// True when there is no item at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every score is 0 or 1 (accuracies), so a Wilson interval applies.
    pub fn binary(&self) -> bool {
        self.strata
            .iter()
            .all(|(_, v)| v.iter().all(|&x| x == 0.0 || x == 1.0))
    }

    /// Usable: at least one stratum, none empty, every score finite.
    pub fn valid(&self) -> bool {
        !self.strata.is_empty()
            && self
                .strata
                .iter()
                .all(|(_, v)| !v.is_empty() && v.iter().all(|x| x.is_finite()))
    }

    /// The metric on the items drawn for resample `b`.
    fn resampled(&self, seed: u64, b: usize) -> f64 {
        let mut sum = 0.0;
        for (name, v) in &self.strata {
            let mut rng = item_rng(seed, b, name, v.len());
            let mut s = 0.0;
            for _ in 0..v.len() {
                s += v[rng.below(v.len())];
            }
            sum += s / v.len() as f64;
        }
        sum / self.strata.len() as f64
    }
}

/// The generator of resample `b`'s draw of a stratum: a function of the stratum's name and
/// size only, so every run on the same items gets the same draw (paired differences).
fn item_rng(seed: u64, b: usize, stratum: &str, n: usize) -> Rng {
    Rng::new(seed).fork(&format!("items/{stratum}/{n}/{b}"))
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// One seed replicate of a point: its metric as the eval reported it, and its items when
/// the eval's `samples.jsonl` gave them.
#[derive(Debug, Clone)]
pub struct Replicate {
    /// The metric as `metrics.json` has it.
    pub value: f64,
    /// Per-item scores (None: no item-level uncertainty for this replicate).
    pub items: Option<Items>,
}

/// Where a point's uncertainty comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Items within each seed and the spread over seeds.
    ItemsAndSeeds,
    /// Items of one run.
    Items,
    /// The spread over seeds only (no per-item scores).
    Seeds,
    /// One run without per-item scores: no interval.
    None,
}

impl Source {
    /// How the report names the source.
    pub fn describe(self) -> &'static str {
        match self {
            Source::ItemsAndSeeds => "items and seeds",
            Source::Items => "items",
            Source::Seeds => "seeds only",
            Source::None => "none",
        }
    }
}

/// A point's estimate: the mean over its replicates, the bootstrap draws behind its
/// interval (kept so differences between points can be resampled jointly), and the interval.
#[derive(Debug, Clone)]
pub struct Estimate {
    /// The mean over seeds of each seed's metric.
    pub mean: f64,
    /// Lower end of the 95% interval (NaN: none).
    pub lo: f64,
    /// Upper end of the 95% interval (NaN: none).
    pub hi: f64,
    /// Replicates (seeds) behind the mean.
    pub seeds: usize,
    /// What the interval accounts for.
    pub source: Source,
    /// Bootstrap draws of the mean (empty when `source` is None).
    pub draws: Vec<f64>,
}

impl Estimate {
    /// True when the estimate has an interval.
    pub fn has_interval(&self) -> bool {
        self.source != Source::None && self.lo.is_finite() && self.hi.is_finite()
    }
}

/// numpy's default (linear) percentile of sorted values, `q` in [0, 1].
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let h = q * (sorted.len() - 1) as f64;
    let i = h.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    sorted[i] + (h - i as f64) * (sorted[j] - sorted[i])
}

/// The 2.5% and 97.5% percentiles of bootstrap draws (NaNs dropped).
pub fn percentile_interval(draws: &[f64]) -> (f64, f64) {
    let mut s: Vec<f64> = draws.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    (percentile(&s, 0.025), percentile(&s, 0.975))
}

/// The Wilson score interval for `p` observed on `n` binomial items (95%).
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    // At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); the formula leaves a
    // rounding residue there (1.7e-18 at n = 150) that a report would print.
    let lo = if p <= 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if p >= 1.0 {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// The percentile bootstrap of one run's items with `replicates` resamples: (mean, lo, hi).
/// The Wilson floor applies as for any point (see the module's doc).
pub fn item_interval(items: &Items, replicates: usize, seed: u64) -> (f64, f64, f64) {
    let e = estimate(
        &[Replicate {
            value: items.statistic(),
            items: Some(items.clone()),
        }],
        "",
        replicates,
        seed,
    );
    (e.mean, e.lo, e.hi)
}

/// A point's mean and interval from its replicates (see the module's doc for the scheme).
/// `label` names the point, so its seed draws are its own.
pub fn estimate(reps: &[Replicate], label: &str, replicates: usize, seed: u64) -> Estimate {
    let reps: Vec<&Replicate> = reps.iter().filter(|r| r.value.is_finite()).collect();
    let s = reps.len();
    let mean_value = mean(&reps.iter().map(|r| r.value).collect::<Vec<_>>());
    let with_items = reps
        .iter()
        .all(|r| r.items.as_ref().is_some_and(Items::valid));
    let source = match (s, with_items) {
        (0, _) => Source::None,
        (1, true) => Source::Items,
        (1, false) => Source::None,
        (_, true) => Source::ItemsAndSeeds,
        (_, false) => Source::Seeds,
    };
    if source == Source::None {
        return Estimate {
            mean: mean_value,
            lo: f64::NAN,
            hi: f64::NAN,
            seeds: s,
            source,
            draws: Vec::new(),
        };
    }
    let scale = if s > 1 {
        (s as f64 / (s as f64 - 1.0)).sqrt()
    } else {
        0.0
    };
    let seed_rng = Rng::new(seed).fork(&format!("seeds/{label}"));
    let mut theta = vec![0.0; s];
    let mut draws = Vec::with_capacity(replicates);
    for b in 0..replicates {
        for (t, r) in theta.iter_mut().zip(&reps) {
            *t = match (&r.items, with_items) {
                (Some(items), true) => items.resampled(seed, b),
                _ => r.value,
            };
        }
        let all = mean(&theta);
        if s == 1 {
            draws.push(all);
            continue;
        }
        let mut rng = seed_rng.fork(&b.to_string());
        let mut sum = 0.0;
        for _ in 0..s {
            sum += theta[rng.below(s)];
        }
        draws.push(all + scale * (sum / s as f64 - all));
    }
    let (mut lo, mut hi) = percentile_interval(&draws);
    // The Wilson floor for binomial means near 0 or 1 (items are shared across seeds, so a
    // run's item count is the binomial n).
    if with_items {
        let items = reps[0].items.as_ref().expect("checked");
        if reps
            .iter()
            .all(|r| r.items.as_ref().is_some_and(Items::binary))
        {
            let n = items.len();
            let k = mean_value * n as f64;
            if k < FEW || (n as f64 - k) < FEW {
                let (wl, wh) = wilson(mean_value, n);
                lo = lo.min(wl);
                hi = hi.max(wh);
            }
        }
    }
    Estimate {
        mean: mean_value,
        lo,
        hi,
        seeds: s,
        source,
        draws,
    }
}

/// What a comparison says about a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The 95% interval of the difference excludes 0 in the paper's direction.
    Supports,
    /// It excludes 0 the other way.
    Contradicts,
    /// It contains 0, or there is no interval.
    CannotTell,
}

impl Verdict {
    /// The words findings.json and the tables use.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Supports => "supports",
            Verdict::Contradicts => "contradicts",
            Verdict::CannotTell => "cannot tell",
        }
    }
}

/// A difference `a - b` between two estimates, resampled jointly (paired over items).
#[derive(Debug, Clone)]
pub struct Difference {
    /// a.mean - b.mean.
    pub value: f64,
    /// 95% interval (NaN: none).
    pub lo: f64,
    /// 95% interval (NaN: none).
    pub hi: f64,
    /// Positive, negative or no evidence of a difference in the paper's direction (> 0).
    pub verdict: Verdict,
}

/// `a - b` with its percentile interval from the paired draws; the verdict reads a positive
/// difference as the paper's direction. Without an interval on both sides: cannot tell.
pub fn difference(a: &Estimate, b: &Estimate) -> Difference {
    let value = a.mean - b.mean;
    if !a.has_interval() || !b.has_interval() || a.draws.len() != b.draws.len() {
        return Difference {
            value,
            lo: f64::NAN,
            hi: f64::NAN,
            verdict: Verdict::CannotTell,
        };
    }
    let d: Vec<f64> = a.draws.iter().zip(&b.draws).map(|(x, y)| x - y).collect();
    let (lo, hi) = percentile_interval(&d);
    Difference {
        value,
        lo,
        hi,
        verdict: verdict(lo, hi),
    }
}

/// Supports when the interval is above 0, contradicts when below, else cannot tell.
pub fn verdict(lo: f64, hi: f64) -> Verdict {
    if lo > 0.0 {
        Verdict::Supports
    } else if hi < 0.0 {
        Verdict::Contradicts
    } else {
        Verdict::CannotTell
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert!((percentile(&v, 0.5) - 2.5).abs() < 1e-12);
        assert!((percentile(&v, 0.025) - 1.075).abs() < 1e-12);
    }

    #[test]
    fn wilson_at_the_edges() {
        let (lo, hi) = wilson(0.0, 150);
        assert_eq!(lo, 0.0);
        // z^2 / (n + z^2)
        assert!((hi - Z * Z / (150.0 + Z * Z)).abs() < 1e-12, "{hi}");
        let (lo, hi) = wilson(1.0, 150);
        assert!((lo - 150.0 / (150.0 + Z * Z)).abs() < 1e-12);
        assert_eq!(hi, 1.0);
    }

    #[test]
    fn all_wrong_is_not_certain() {
        let items = Items::flat("gsm8k", vec![0.0; 150]);
        let (m, lo, hi) = item_interval(&items, 500, SEED);
        assert_eq!((m, lo), (0.0, 0.0));
        assert!(hi > 0.02 && hi < 0.03, "{hi}");
        // Not binary: a constant score has a zero-width interval, as scipy's percentile.
        let items = Items::flat("humaneval", vec![0.5; 20]);
        assert_eq!(item_interval(&items, 500, SEED), (0.5, 0.5, 0.5));
    }

    #[test]
    fn same_inputs_same_bits_and_paired_differences() {
        let a: Vec<f64> = (0..150).map(|i| ((i * 7) % 3 == 0) as u8 as f64).collect();
        let items = Items::flat("gsm8k", a.clone());
        assert_eq!(
            item_interval(&items, 300, SEED),
            item_interval(&items, 300, SEED)
        );
        let rep = |v: Vec<f64>| Replicate {
            value: mean(&v),
            items: Some(Items::flat("gsm8k", v)),
        };
        // The same items one better on every 10th: the paired difference is exactly 0.1
        // in every resample with those items... and its interval excludes 0.
        let b: Vec<f64> = a
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 10 == 0 { 1.0 } else { x })
            .collect();
        let ea = estimate(&[rep(a.clone())], "a", 300, SEED);
        let eb = estimate(&[rep(b)], "b", 300, SEED);
        let d = difference(&eb, &ea);
        assert_eq!(d.verdict, Verdict::Supports, "{d:?}");
        let same = difference(&ea, &estimate(&[rep(a)], "c", 300, SEED));
        assert_eq!((same.lo, same.hi), (0.0, 0.0));
        assert_eq!(same.verdict, Verdict::CannotTell);
    }

    #[test]
    fn one_run_without_items_has_no_interval() {
        let e = estimate(
            &[Replicate {
                value: 0.3,
                items: None,
            }],
            "x",
            100,
            SEED,
        );
        assert_eq!(e.source, Source::None);
        assert!(!e.has_interval());
        assert_eq!(difference(&e, &e).verdict, Verdict::CannotTell);
    }
}
