//! Confidence intervals by the bootstrap: the repeats of a scenario (each an A/B pair and its
//! cost run) are drawn again with replacement, as many as there were, the statistic computed on
//! each draw; the 2.5th and 97.5th percentiles of those are the 95 % interval. Resampling whole
//! repeats keeps what belongs together (an untraced run and the traced run next to it) together.
//! Deterministic: a fixed seed, so the same runs give the same interval.

/// Draws per interval.
const DRAWS: usize = 4000;

/// A figure and its 95 % interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Estimate {
    pub(super) value: f64,
    pub(super) lo: f64,
    pub(super) hi: f64,
}

impl Estimate {
    pub(super) fn width(&self) -> f64 {
        self.hi - self.lo
    }
}

/// splitmix64: small, fast, good enough to pick indices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The value of `stat` on the `n` repeats as measured, and its bootstrap interval. `stat` gets
/// the indices of the repeats of one draw (with repetitions) and returns None when it cannot be
/// computed from them. None with fewer than 2 repeats (no spread to draw from).
pub(super) fn interval(n: usize, stat: &dyn Fn(&[usize]) -> Option<f64>) -> Option<Estimate> {
    let all: Vec<usize> = (0..n).collect();
    let value = stat(&all)?;
    if n < 2 {
        return None;
    }
    let mut rng = Rng(0x0074_7774_7261_6365);
    let mut draws = Vec::with_capacity(DRAWS);
    let mut idx = vec![0; n];
    for _ in 0..DRAWS {
        for i in idx.iter_mut() {
            *i = rng.below(n);
        }
        if let Some(v) = stat(&idx) {
            draws.push(v);
        }
    }
    if draws.len() < DRAWS / 2 {
        return None;
    }
    draws.sort_by(|a, b| a.total_cmp(b));
    Some(Estimate {
        value,
        lo: percentile(&draws, 0.025),
        hi: percentile(&draws, 0.975),
    })
}

/// Of sorted values, linear between the two nearest ranks.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    match sorted.get(i + 1) {
        Some(next) => sorted[i] + (next - sorted[i]) * frac,
        None => sorted[i],
    }
}

/// The mean of `v` at the drawn indices.
pub(super) fn mean_at(v: &[f64], idx: &[usize]) -> Option<f64> {
    if idx.is_empty() {
        return None;
    }
    Some(idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.025), 2.5);
        assert_eq!(percentile(&v, 0.975), 97.5);
        assert_eq!(percentile(&[4.0], 0.5), 4.0);
    }

    #[test]
    fn identical_repeats_give_a_zero_width_interval() {
        let v = [0.9; 6];
        let e = interval(v.len(), &|idx| mean_at(&v, idx)).unwrap();
        assert_eq!((e.value, e.lo, e.hi), (0.9, 0.9, 0.9));
        assert_eq!(e.width(), 0.0);
    }

    #[test]
    fn the_interval_holds_the_mean_and_narrows_with_more_repeats() {
        // Values alternate 1 and 3: mean 2, spread 1.
        let few: Vec<f64> = (0..6).map(|i| if i % 2 == 0 { 1.0 } else { 3.0 }).collect();
        let many: Vec<f64> = (0..60)
            .map(|i| if i % 2 == 0 { 1.0 } else { 3.0 })
            .collect();
        let a = interval(few.len(), &|idx| mean_at(&few, idx)).unwrap();
        let b = interval(many.len(), &|idx| mean_at(&many, idx)).unwrap();
        assert_eq!(a.value, 2.0);
        assert!(a.lo < 2.0 && a.hi > 2.0, "{a:?}");
        assert!(b.lo < 2.0 && b.hi > 2.0, "{b:?}");
        // Standard error sqrt(1/n): about 0.41 for 6, 0.13 for 60; the interval is ~4 of them.
        assert!(a.width() > 1.0 && a.width() < 2.0, "{a:?}");
        assert!(b.width() > 0.35 && b.width() < 0.65, "{b:?}");
        // Deterministic.
        assert_eq!(a, interval(few.len(), &|idx| mean_at(&few, idx)).unwrap());
    }

    #[test]
    fn a_ratio_of_means_is_drawn_pairwise() {
        // Numerator and denominator move together: the ratio is always 0.5 whatever is drawn.
        let num = [1.0, 2.0, 3.0, 4.0];
        let den = [2.0, 4.0, 6.0, 8.0];
        let e = interval(4, &|idx| Some(mean_at(&num, idx)? / mean_at(&den, idx)?)).unwrap();
        assert_eq!((e.value, e.lo, e.hi), (0.5, 0.5, 0.5));
    }

    #[test]
    fn one_repeat_has_no_interval() {
        assert_eq!(interval(1, &|idx| mean_at(&[1.0], idx)), None);
        assert_eq!(interval(0, &|idx| mean_at(&[], idx)), None);
    }
}
