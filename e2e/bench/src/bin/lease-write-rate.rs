//! The apiserver's raw write ceiling, as a yardstick for the queue: how many Lease creates per second it accepts
//! from C concurrent streams, with nothing else going on (no watches, no status writes, no Events).
//!
//! ```sh
//! kubectl create namespace lease-rate
//! cargo run --release -p bgjobs-bench --bin lease-write-rate -- --namespace lease-rate --concurrency 16 --count 3000
//! kubectl delete namespace lease-rate
//! ```
//!
//! The Leases look like bgjobs' claim Leases (same annotations, labels and spec fields, see `src/lease/mod.rs`), so one
//! create here costs the apiserver and etcd what one claim create costs; only the `managed-by` label differs, so that
//! no operator watching every namespace caches them. The namespace must exist and be empty of `rate-*` Leases; this
//! program does not delete what it creates (deleting the namespace does). The last line is machine-readable:
//! `RESULT {"creates":..,"seconds":..,"creates_per_s":..,...}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bgjobs::wire;
use clap::Parser;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// The apiserver's raw write ceiling: Lease creates per second from concurrent streams.
#[derive(Parser)]
#[command(name = "lease-write-rate")]
struct Args {
    /// The namespace to create the Leases in (it must exist and hold no `rate-*` Leases).
    #[arg(long, short = 'n')]
    namespace: String,
    /// Concurrent create streams.
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Leases to create (timed), after one warm-up create per stream.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
}

/// A Lease shaped like a bgjobs claim Lease (as the operator writes them): the same annotation keys, read from the
/// product so they cannot drift; only the `managed-by` value differs (see the module docs).
fn lease(name: String, i: usize) -> Lease {
    let now = MicroTime(jiff::Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                (wire::MANAGED_BY_LABEL.to_string(), "bgjobs-bench".to_string()),
                (bgjobs::wire::JOB_LABEL.to_string(), name),
            ])),
            annotations: Some(BTreeMap::from([
                (wire::JOB_UID_ANNOTATION.to_string(), format!("00000000-0000-4000-8000-{i:012}")),
                (wire::ATTEMPT_ANNOTATION.to_string(), "1".to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("lease-write-rate".into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

/// Create `prefix-<i>` for every i handed out by `next` below `count`; returns the latencies of the successes.
async fn stream(
    api: Api<Lease>,
    prefix: &'static str,
    next: Arc<AtomicUsize>,
    count: usize,
    errors: Arc<AtomicUsize>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            return latencies;
        }
        let sent = Instant::now();
        match api.create(&PostParams::default(), &lease(format!("{prefix}-{i}"), i)).await {
            Ok(_) => latencies.push(sent.elapsed()),
            Err(e) => {
                // Report the first few; an apiserver that refuses everything should not flood the terminal.
                if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("lease-write-rate: create {prefix}-{i} failed: {e}");
                }
            }
        }
    }
}

/// Run `concurrency` streams until `count` creates were sent; returns (latencies of successes, errors, wall time).
async fn run(api: &Api<Lease>, prefix: &'static str, concurrency: usize, count: usize) -> (Vec<Duration>, usize, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(stream(api.clone(), prefix, next.clone(), count, errors.clone())))
        .collect();
    let mut latencies = Vec::with_capacity(count);
    for t in tasks {
        latencies.extend(t.await.expect("a create stream panicked"));
    }
    let seconds = t0.elapsed().as_secs_f64();
    (latencies, errors.load(Ordering::Relaxed), seconds)
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (concurrency, count) = (usize::from(args.concurrency), args.count as usize);
    let client = kube::Client::try_default().await?;
    let api: Api<Lease> = Api::namespaced(client, &args.namespace);

    // Warm-up outside the clock: one create per stream opens the connections (TCP + TLS) the timed run reuses.
    let (_, warm_errors, _) = run(&api, "warmup", concurrency, concurrency).await;
    if warm_errors == concurrency {
        return Err(format!("every warm-up create failed (does namespace {} exist?)", args.namespace).into());
    }

    let (mut latencies, errors, seconds) = run(&api, "rate", concurrency, count).await;
    latencies.sort_unstable();
    let created = latencies.len();
    let rate = created as f64 / seconds;
    let (p50, p99) = (percentile_ms(&latencies, 0.50), percentile_ms(&latencies, 0.99));
    println!(
        "created {created} Leases with {} concurrent streams in {seconds:.2} s: {rate:.1} creates/s \
         (latency p50 {p50:.1} ms, p99 {p99:.1} ms, {errors} errors)",
        args.concurrency
    );
    println!(
        "RESULT {}",
        serde_json::json!({
            "creates": created,
            "errors": errors,
            "concurrency": args.concurrency,
            "seconds": seconds,
            "creates_per_s": rate,
            "p50_ms": p50,
            "p99_ms": p99,
        })
    );
    if created == 0 {
        return Err("no Lease was created".into());
    }
    Ok(())
}
