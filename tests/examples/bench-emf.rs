//! What a histogram value costs in the EMF recorder, against the 100-value reservoir
//! it replaced (kept here as the baseline, as it was), in the same run; and what a
//! render costs. Run by hand, in release:
//!
//! ```sh
//! cargo run --release -p e2e --example bench-emf
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use metrics::{Histogram, HistogramFn};
use metrics_emf::{EmfConfig, EmfRecorder};

const VALUES: u64 = 4_000_000;
const THREADS: u64 = 4;

/// The recorder's histogram before: a uniform sample of at most 100 values.
#[derive(Debug, Default)]
struct Reservoir(Mutex<(u64, Vec<f64>)>);

impl HistogramFn for Reservoir {
    fn record(&self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let mut sample = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sample.0 += 1;
        if sample.1.len() < 100 {
            sample.1.push(value);
        } else {
            let slot = rand::random_range(0..sample.0);
            if let Some(v) = usize::try_from(slot).ok().and_then(|i| sample.1.get_mut(i)) {
                *v = value;
            }
        }
    }
}

/// A latency-like value: 0.5 ms to about 8 s, spread over 14 powers of two.
fn value(i: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let x = (i.wrapping_mul(2_654_435_761) % 1_000_000) as f64 / 1_000_000.0;
    0.5 * 2f64.powf(x * 14.0)
}

/// Nanoseconds per value for `threads` threads recording into `histogram`.
fn per_value(histogram: &Histogram, threads: u64) -> f64 {
    let each = VALUES / threads;
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let h = histogram.clone();
            s.spawn(move || {
                for i in 0..each {
                    h.record(value(t * each + i));
                }
            });
        }
    });
    #[allow(clippy::cast_precision_loss)]
    let ns = started.elapsed().as_nanos() as f64 / VALUES as f64;
    ns
}

fn main() {
    let recorder = EmfRecorder::new(
        EmfConfig::builder("Bench")
            .interval(Duration::from_secs(60))
            .dimension("Service", "bench")
            .build()
            .expect("a valid EMF configuration"),
    );
    let handle = recorder.handle();
    let emf = metrics::with_local_recorder(&recorder, || metrics::histogram!("Latency"));
    let reservoir = Histogram::from_arc(Arc::new(Reservoir::default()));
    println!("{VALUES} values per run, ns per value (lower is better)");
    for threads in [1, THREADS] {
        // Alternate, twice each, so the machine's noise falls on both.
        let mut emf_ns = Vec::new();
        let mut reservoir_ns = Vec::new();
        for _ in 0..2 {
            emf_ns.push(per_value(&emf, threads));
            let _ = handle.render();
            reservoir_ns.push(per_value(&reservoir, threads));
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
        println!(
            "{threads} thread(s): distribution {:.1} ns, reservoir (before) {:.1} ns",
            best(&emf_ns),
            best(&reservoir_ns)
        );
    }
    // A render after a full interval's worth of values over the whole range.
    for i in 0..VALUES {
        emf.record(value(i));
    }
    let started = Instant::now();
    let lines = handle.render();
    println!(
        "render of {VALUES} values: {:?}, {} bytes",
        started.elapsed(),
        lines.iter().map(String::len).sum::<usize>()
    );
}
