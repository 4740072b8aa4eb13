//! `pbft-sim`: soak the protocol with many seeded scenarios, or replay one verbosely.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use pbft_sim::{FaultClass, Outcome, Scenario};

#[derive(Parser)]
#[command(
    about = "Run seeded PBFT cluster simulations with Byzantine replicas and a hostile network"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Number of scenarios to run.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replay this one seed with a full event trace.
    #[arg(long, env = "PBFT_SEED")]
    seed: Option<u64>,
    /// Break the protocol on purpose (weak-quorum, skip-digest-check or skip-vouch-check),
    /// to show the simulator catches it. Needs `--features mutations`.
    #[cfg(feature = "mutations")]
    #[arg(long)]
    mutation: Option<String>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// A live 4-replica cluster in this process (simulated network, real protocol and
    /// signatures) under client load, with a status line per replica every second. The
    /// primary crashes at 10 s and returns at 20 s.
    Demo {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn demo(seconds: u64) -> Result<()> {
    let mut sim = pbft_sim::Sim::new(Scenario::demo(seconds), false);
    let started = Instant::now();
    let mut last_done = 0;
    println!(
        "4-replica PBFT cluster, 8 clients; replica 0 (the primary) crashes at 10s, returns at 20s"
    );
    for second in 1..=seconds {
        if let Err(f) = sim.advance(1_000) {
            bail!("safety check failed: {f}");
        }
        let done = sim.completed_requests();
        println!(
            "t={second:>3}s  commits/s={:<6} total={done}",
            done - last_done
        );
        last_done = done;
        let statuses = sim.statuses();
        let top = statuses
            .iter()
            .flatten()
            .map(|s| s.last_executed)
            .max()
            .unwrap_or(0);
        for (i, st) in statuses.iter().enumerate() {
            match st {
                Some(s) => println!(
                    "    r{i}  view={:<3} primary=r{:<2} height={:<7} stable={:<7} lag={:<4}{}",
                    s.view,
                    s.primary.0,
                    s.last_executed,
                    s.stable_checkpoint,
                    top - s.last_executed,
                    if s.view_change_in_progress {
                        " (view change)"
                    } else {
                        ""
                    }
                ),
                None => println!("    r{i}  DOWN"),
            }
        }
        // Pace virtual time to wall time so the view reads like a live cluster.
        let due = std::time::Duration::from_secs(second);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

fn scenario(seed: u64, args: &Args) -> Result<Scenario> {
    #[allow(unused_mut)]
    let mut sc = Scenario::from_seed(seed);
    #[cfg(feature = "mutations")]
    if let Some(m) = &args.mutation {
        sc.config.mutation = Some(match m.as_str() {
            "weak-quorum" => pbft_core::Mutation::WeakQuorum,
            "skip-digest-check" => pbft_core::Mutation::SkipDigestCheck,
            "skip-vouch-check" => pbft_core::Mutation::SkipVouchCheck,
            other => bail!(
                "unknown mutation {other:?}: weak-quorum, skip-digest-check or skip-vouch-check"
            ),
        });
    }
    let _ = args;
    Ok(sc)
}

#[derive(Default)]
struct ClassStats {
    runs: u64,
    requests: u64,
    view_changes: u64,
    syncs: u64,
    rejected: u64,
    recovery_ms: Vec<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Command::Demo { seconds }) = args.command {
        return demo(seconds);
    }
    if let Some(seed) = args.seed {
        return match pbft_sim::run(scenario(seed, &args)?, true) {
            Ok(o) => {
                println!("seed {seed} passed: {o:?}");
                Ok(())
            }
            Err(f) => bail!("seed {seed} FAILED: {f}"),
        };
    }
    let started = Instant::now();
    let mut stats = BTreeMap::<FaultClass, ClassStats>::new();
    for seed in args.start..args.start + args.seeds {
        let o: Outcome = match pbft_sim::run(scenario(seed, &args)?, false) {
            Ok(o) => o,
            Err(f) => bail!("seed {seed} FAILED: {f}\nreplay: PBFT_SEED={seed} make sim-replay"),
        };
        let s = stats.entry(FaultClass::for_seed(seed)).or_default();
        s.runs += 1;
        s.requests += o.completed_requests as u64;
        s.view_changes += o.view_changes;
        s.syncs += o.syncs;
        s.rejected += o.rejected;
        s.recovery_ms.push(o.recovery_ms);
        let done = seed - args.start + 1;
        if done % 500 == 0 {
            let secs = started.elapsed().as_secs_f64();
            println!("{done} scenarios, {:.1}/s", done as f64 / secs);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{:<24} {:>5} {:>9} {:>8} {:>7} {:>9} {:>13}",
        "class", "runs", "requests", "vchanges", "syncs", "rejected", "p50/max heal→done ms"
    );
    for (class, s) in &mut stats {
        s.recovery_ms.sort_unstable();
        let p50 = s.recovery_ms[s.recovery_ms.len() / 2];
        let max = s.recovery_ms.last().copied().unwrap_or(0);
        println!(
            "{:<24} {:>5} {:>9} {:>8} {:>7} {:>9} {:>6}/{}",
            class.to_string(),
            s.runs,
            s.requests,
            s.view_changes,
            s.syncs,
            s.rejected,
            p50,
            max
        );
    }
    let total: u64 = stats.values().map(|s| s.requests).sum();
    println!(
        "{} scenarios passed in {secs:.1}s ({:.1} scenarios/s), {total} client requests committed",
        args.seeds,
        args.seeds as f64 / secs
    );
    Ok(())
}
