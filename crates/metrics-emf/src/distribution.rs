//! A histogram's values between two lines, in the form CloudWatch takes them.
//!
//! CloudWatch computes a metric's statistics from `Values` and `Counts` as
//! `PutMetricData` does: the sample count is the sum of the counts and the sum is
//! the sum of value × count. A sample of the values gets both wrong once there are
//! more than it holds. Here every value lands in a bucket that keeps its count and
//! its sum, and a bucket is written as its mean with its count, so count and sum are
//! exact at any rate; the smallest and the largest value are written as themselves.
//! Only percentiles are approximate: with 8 buckets per power of two, the values of
//! one bucket are within 12.5 % of each other; when the values span more than 12
//! powers of two, neighbouring buckets merge to fit the 100 values EMF allows.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::MAX_SAMPLES;

#[derive(Debug, Default)]
pub(crate) struct Distribution {
    buckets: BTreeMap<i32, Bucket>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    count: u64,
    sum: f64,
}

impl Bucket {
    fn add(self, other: Self) -> Self {
        Self {
            count: self.count + other.count,
            sum: self.sum + other.sum,
        }
    }
}

/// The bucket of `value`, ordered as the values are: the exponent and the three top
/// bits of the mantissa of its magnitude, signed. Zero has its own.
fn bucket_of(value: f64) -> i32 {
    if value == 0.0 {
        return 0;
    }
    // 11 exponent bits and 3 mantissa bits: below 2^14, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    let magnitude = (value.abs().to_bits() >> 49) as i32 + 1;
    if value < 0.0 { -magnitude } else { magnitude }
}

impl Distribution {
    /// Adds one value; the caller has checked that CloudWatch takes it.
    pub(crate) fn record(&mut self, value: f64) {
        let bucket = self.buckets.entry(bucket_of(value)).or_default();
        bucket.count += 1;
        bucket.sum += value;
        if self.count == 0 {
            (self.min, self.max) = (value, value);
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count += 1;
        self.sum += value;
    }

    /// How many values were recorded.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// The values as EMF's distribution object, each scaled by `factor`: `Values`
    /// (ascending, at most [`MAX_SAMPLES`]) and `Counts`, and the exact `Count`,
    /// `Sum`, `Min` and `Max`. `None` without values: EMF has no empty arrays.
    pub(crate) fn to_emf(&self, factor: f64) -> Option<Value> {
        let pairs = self.values_and_counts();
        if pairs.is_empty() {
            return None;
        }
        let values: Vec<f64> = pairs.iter().map(|(v, _)| v * factor).collect();
        let counts: Vec<u64> = pairs.iter().map(|(_, c)| *c).collect();
        Some(json!({
            "Values": values,
            "Counts": counts,
            "Count": self.count,
            "Sum": self.sum * factor,
            "Min": self.min * factor,
            "Max": self.max * factor,
        }))
    }

    /// (value, count) pairs, ascending and distinct, at most [`MAX_SAMPLES`], whose
    /// counts add up to the count and whose value × count add up to the sum.
    fn values_and_counts(&self) -> Vec<(f64, u64)> {
        let mut buckets: Vec<Bucket> = self.buckets.values().copied().collect();
        // Two places are kept for the minimum and the maximum; neighbours merge
        // until the rest fits, which keeps every count and sum.
        while buckets.len() > MAX_SAMPLES - 2 {
            buckets = buckets
                .chunks(2)
                .map(|pair| pair.iter().copied().fold(Bucket::default(), Bucket::add))
                .collect();
        }
        let mut pairs: Vec<(f64, u64)> = Vec::with_capacity(MAX_SAMPLES);
        let mut push = |value: f64, count: u64| match pairs.last_mut() {
            Some((last, n)) if *last == value => *n += count,
            _ => pairs.push((value, count)),
        };
        let last = buckets.len().saturating_sub(1);
        for (i, Bucket { mut count, mut sum }) in buckets.into_iter().enumerate() {
            let low = (i == 0 && count > 0).then(|| {
                count -= 1;
                sum -= self.min;
                self.min
            });
            let high = (i == last && count > 0).then(|| {
                count -= 1;
                sum -= self.max;
                self.max
            });
            if let Some(min) = low {
                push(min, 1);
            }
            if count > 0 {
                #[allow(clippy::cast_precision_loss)]
                let mean = (sum / count as f64).clamp(self.min, self.max);
                push(mean, count);
            }
            if let Some(max) = high {
                push(max, 1);
            }
        }
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_in_value_order_and_an_eighth_of_a_power_of_two_wide() {
        let mut last = i32::MIN;
        let mut v = -1e12;
        while v < 1e12 {
            let b = bucket_of(v);
            assert!(b >= last, "{v}");
            last = b;
            v += v.abs().max(1e-9) * 0.01;
        }
        assert_eq!(bucket_of(0.0), bucket_of(-0.0));
        assert_eq!(bucket_of(96.0), bucket_of(103.9));
        assert_ne!(bucket_of(96.0), bucket_of(104.0));
        assert_eq!(bucket_of(-96.0), -bucket_of(96.0));
    }

    #[test]
    fn count_sum_min_and_max_are_exact_and_values_at_most_a_hundred() {
        let mut d = Distribution::default();
        let mut sum = 0.0;
        for i in 0..100_000u32 {
            let v = f64::from(i % 10_007) - 500.0;
            d.record(v);
            sum += v;
        }
        let pairs = d.values_and_counts();
        assert!(pairs.len() <= MAX_SAMPLES, "{}", pairs.len());
        assert_eq!(pairs.iter().map(|(_, c)| c).sum::<u64>(), d.count());
        let weighted: f64 = pairs.iter().map(|(v, c)| v * *c as f64).sum();
        assert!(
            (weighted - sum).abs() <= sum.abs() * 1e-12,
            "{weighted} vs {sum}"
        );
        assert_eq!(pairs.first().map(|p| p.0), Some(-500.0));
        assert_eq!(pairs.last().map(|p| p.0), Some(9506.0));
        assert!(
            pairs.windows(2).all(|w| w[0].0 < w[1].0),
            "ascending, distinct"
        );
    }

    #[test]
    fn a_few_values_are_written_as_they_are() {
        let mut d = Distribution::default();
        for v in [12.5, 12.5, 40.0, 7.0] {
            d.record(v);
        }
        assert_eq!(d.values_and_counts(), vec![(7.0, 1), (12.5, 2), (40.0, 1)]);
        let mut one = Distribution::default();
        one.record(3.0);
        one.record(3.0);
        assert_eq!(one.values_and_counts(), vec![(3.0, 2)]);
        assert!(Distribution::default().to_emf(1.0).is_none());
    }
}
