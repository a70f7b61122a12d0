//! What a rate-limited warning costs on the request path (`src/logthrottle.rs`): the
//! check made for every occurrence, most of them suppressed while an upstream is down.
//!
//! Run: `cargo bench --bench logthrottle`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

use specter::logthrottle::Throttle;

fn check(c: &mut Criterion) {
    static SITE: Throttle = Throttle::new("bench");
    // Many keys already known, like a config with many environments.
    let names: Vec<String> = (0..32).map(|i| format!("environment-{i}")).collect();
    for name in &names {
        let _ = SITE.check(&["upstream_unavailable", name]);
    }
    c.bench_function("logthrottle/check_suppressed", |b| {
        b.iter(|| SITE.check(black_box(&["upstream_unavailable", "environment-7"])))
    });
    // Two threads hammering the same key: the slot's atomics are shared.
    c.bench_function("logthrottle/check_suppressed_contended", |b| {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = SITE.check(black_box(&["upstream_unavailable", "environment-7"]));
                }
            });
            b.iter(|| SITE.check(black_box(&["upstream_unavailable", "environment-7"])));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    });
}

criterion_group!(benches, check);
criterion_main!(benches);
