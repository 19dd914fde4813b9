//! Learning-rate schedules, as functions of the step (0-based) and the total step count.

/// A schedule's shape; `lr` is its peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Linear warmup to the peak, then cosine decay to `final_fraction` of it.
    Cosine { warmup: u64, final_fraction: f64 },
    /// The paper's CPT trapezoid: linear warmup, constant, then a linear cooldown to
    /// `final_fraction` over the last `cooldown` steps.
    Trapezoid {
        warmup: u64,
        cooldown: u64,
        final_fraction: f64,
    },
    /// Linear warmup, then constant.
    Constant { warmup: u64 },
}

/// A warmup or cooldown param in steps: a fraction of `total` when below 1, else a count.
pub fn steps_or_fraction(v: f64, total: u64) -> u64 {
    if v < 1.0 {
        (v * total as f64).round() as u64
    } else {
        v as u64
    }
}

/// The first step of the trapezoid's cooldown in a run of `total` steps, for a `cooldown`
/// param (fraction or count): where a cooldown branch starts.
pub fn cooldown_start(total: u64, cooldown: f64) -> u64 {
    total.saturating_sub(steps_or_fraction(cooldown, total))
}

impl Schedule {
    /// The learning rate of step `step` (0-based) of `total`.
    pub fn lr(&self, peak: f64, step: u64, total: u64) -> f64 {
        let warm = |w: u64| {
            if w > 0 && step < w {
                Some(peak * (step + 1) as f64 / w as f64)
            } else {
                None
            }
        };
        match *self {
            Schedule::Constant { warmup } => warm(warmup).unwrap_or(peak),
            Schedule::Cosine {
                warmup,
                final_fraction,
            } => warm(warmup).unwrap_or_else(|| {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                peak * (final_fraction + (1.0 - final_fraction) * cos)
            }),
            Schedule::Trapezoid {
                warmup,
                cooldown,
                final_fraction,
            } => warm(warmup).unwrap_or_else(|| {
                let start = total.saturating_sub(cooldown);
                if step < start || cooldown == 0 {
                    peak
                } else {
                    let progress = ((step - start + 1) as f64 / cooldown as f64).min(1.0);
                    peak * (1.0 - (1.0 - final_fraction) * progress)
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_hit_their_landmarks() {
        let c = Schedule::Cosine {
            warmup: 10,
            final_fraction: 0.01,
        };
        assert!((c.lr(1.0, 0, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr(1.0, 9, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr(1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!(
            (c.lr(1.0, 55, 100) - 0.505).abs() < 1e-9,
            "half-way: mean of peak and floor"
        );
        assert!((c.lr(1.0, 100, 100) - 0.01).abs() < 1e-12);
        let t = Schedule::Trapezoid {
            warmup: 5,
            cooldown: 20,
            final_fraction: 0.0,
        };
        assert_eq!(t.lr(2.0, 50, 100), 2.0);
        assert_eq!(t.lr(2.0, 79, 100), 2.0);
        assert!((t.lr(2.0, 89, 100) - 1.0).abs() < 1e-12);
        assert!(t.lr(2.0, 99, 100).abs() < 1e-12);
        let k = Schedule::Constant { warmup: 0 };
        assert_eq!(k.lr(3.0, 0, 10), 3.0);
    }
}
