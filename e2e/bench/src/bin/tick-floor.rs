//! The floor of one recurring tick: the writes bgjobs makes for each definition on a tick (the claim, a status
//! replace under the definition's resourceVersion; then the create of the tick's job), sent by C concurrent streams
//! with no operator running: no watches, no reconcile, no ownership. How late the last of N definitions' jobs is
//! here is as early as the apiserver lets a tick of N definitions end, so `make bench-recurring` prints it next to
//! the lateness it measured. With `--create-only`, the creates alone: the floor of a tick whose claims were all
//! written before it.
//!
//! ```sh
//! cargo run --release -p bgjobs-bench --bin tick-floor -- --namespace <ns with the definitions> --concurrency 96
//! ```
//!
//! The claim and the job are the product's own (`bgjobs::wire::recurring_claim`, `recurring_child`,
//! `recurring_job_name`), for a tick one day ahead, so that no tick the definitions had is touched. It writes to
//! every `RecurringBackgroundJob` in the namespace (their status) and creates one job each: run it on a namespace
//! whose definitions nothing else is scheduling (the benchmark runs it after stopping its replicas). The last line
//! is machine-readable: `RESULT {"definitions":..,"seconds":..,"p50_s":..,"p99_s":..,"max_s":..,"errors":..}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, RecurringBackgroundJob};
use bgjobs::wire::{recurring_child, recurring_claim, recurring_job_name};
use clap::Parser;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};

/// The floor of one recurring tick: a tick's writes for every definition of a namespace, with no operator.
#[derive(Parser)]
#[command(name = "tick-floor")]
struct Args {
    /// The namespace whose RecurringBackgroundJobs get a tick (nothing else may be scheduling them).
    #[arg(long, short = 'n')]
    namespace: String,
    /// Concurrent streams (a replica runs `--recurring-concurrency` ticks at once; the benchmark's 3 replicas x 32).
    #[arg(long, short = 'c', default_value_t = 96, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Create the jobs only, without the claims: the floor of a tick whose claims were written before it.
    #[arg(long)]
    create_only: bool,
    /// The tick is this many days ahead (each run needs its own tick: a second run on the same tick finds its jobs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    days_ahead: u16,
}

/// One definition's tick, as a replica writes it; how long after `t0` its job was created.
async fn tick(
    defs: &Api<RecurringBackgroundJob>,
    jobs: &Api<BackgroundJob>,
    def: &RecurringBackgroundJob,
    at: jiff::Timestamp,
    t0: Instant,
    create_only: bool,
) -> Result<Duration, kube::Error> {
    let name = recurring_job_name(&def.name_any(), at);
    let mut claimed = def.clone();
    if !create_only {
        let status = claimed.status.get_or_insert_with(Default::default);
        recurring_claim(status, at, Some(&name), None);
        claimed = defs.replace_status(&def.name_any(), &PostParams::default(), &claimed).await?;
    }
    jobs.create(&PostParams::default(), &recurring_child(&claimed, &name, at)).await?;
    Ok(t0.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(client.clone(), &args.namespace);
    let jobs: Api<BackgroundJob> = Api::namespaced(client, &args.namespace);
    let all = Arc::new(defs.list(&ListParams::default()).await?.items);
    if all.is_empty() {
        return Err(format!("no RecurringBackgroundJob in namespace {}", args.namespace).into());
    }
    let ahead = i64::from(args.days_ahead) * 86_400;
    let at = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() / 60 * 60 + ahead)?;
    let (next, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let create_only = args.create_only;
    let t0 = Instant::now();
    let streams: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (defs, jobs, all, next, errors) =
                (defs.clone(), jobs.clone(), all.clone(), next.clone(), errors.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                while let Some(def) = all.get(next.fetch_add(1, Ordering::Relaxed)) {
                    match tick(&defs, &jobs, def, at, t0, create_only).await {
                        Ok(after) => done.push(after),
                        // Report the first few; an apiserver that refuses everything should not flood the terminal.
                        Err(e) if errors.fetch_add(1, Ordering::Relaxed) < 3 => {
                            eprintln!("tick-floor: {}: {e}", def.name_any())
                        }
                        Err(_) => {}
                    }
                }
                done
            })
        })
        .collect();
    let mut done = Vec::with_capacity(all.len());
    for s in streams {
        done.extend(s.await.expect("a stream panicked"));
    }
    let seconds = t0.elapsed().as_secs_f64();
    done.sort_unstable();
    let at_share =
        |p: f64| done.get(((done.len().max(1) - 1) as f64 * p).round() as usize).map_or(f64::NAN, |d| d.as_secs_f64());
    let (p50, p99, max) = (at_share(0.50), at_share(0.99), at_share(1.0));
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "a tick of {} definitions ({} each) from {} streams, no operator: {seconds:.2} s; jobs created after p50 \
         {p50:.2} s, p99 {p99:.2} s, max {max:.2} s ({errors} errors)",
        done.len(),
        if create_only { "create" } else { "claim + create" },
        args.concurrency
    );
    println!(
        "RESULT {}",
        serde_json::json!({"definitions": done.len(), "errors": errors, "concurrency": args.concurrency, "create_only": create_only,
                           "seconds": seconds, "p50_s": p50, "p99_s": p99, "max_s": max})
    );
    if done.is_empty() {
        return Err("no tick was written".into());
    }
    Ok(())
}
