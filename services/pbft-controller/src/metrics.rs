//! The controller's Prometheus metrics: one typed struct on one registry, rendered by
//! `/metrics`. Reconcile durations are recorded by a timer that observes on drop, so every
//! exit path of a reconcile (errors included) is measured.

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the controller exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `pbft_controller_reconciliations_total`: reconciles started.
    pub reconciliations: IntCounter,
    /// `pbft_controller_reconcile_failures_total{error}`: failed reconciles by error kind.
    pub failures: IntCounterVec,
    /// `pbft_controller_reconcile_duration_seconds`: how long a reconcile took.
    pub duration: Histogram,
    /// `pbft_controller_leader`: 1 while this instance holds the leader lease.
    pub leader: IntGauge,
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    duration: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Builds and registers every metric on a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciliations = IntCounter::new(
            "pbft_controller_reconciliations_total",
            "Reconciles of PbftCluster objects started",
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "pbft_controller_reconcile_failures_total",
                "Reconciles that failed, by error kind",
            ),
            &["error"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "pbft_controller_reconcile_duration_seconds",
                "Duration of one reconcile",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let leader = IntGauge::new(
            "pbft_controller_leader",
            "1 while this controller instance holds the leader lease",
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Metrics {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
        })
    }

    /// Counts a reconcile and returns the timer that records its duration on drop.
    pub fn count_and_measure(&self) -> ReconcileTimer {
        self.reconciliations.inc();
        ReconcileTimer {
            start: Instant::now(),
            duration: self.duration.clone(),
        }
    }

    /// Counts a failed reconcile under its error kind.
    pub fn failure(&self, kind: &str) {
        self.failures.with_label_values(&[kind]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_records_on_drop_and_failures_by_kind() {
        let m = Metrics::new().unwrap();
        {
            let _t = m.count_and_measure();
            assert_eq!(m.duration.get_sample_count(), 0);
        }
        assert_eq!(m.duration.get_sample_count(), 1);
        assert_eq!(m.reconciliations.get(), 1);
        m.failure("kube");
        m.failure("kube");
        m.failure("yaml");
        assert_eq!(m.failures.with_label_values(&["kube"]).get(), 2);
        let text = m.render();
        assert!(
            text.contains("pbft_controller_reconcile_failures_total{error=\"kube\"} 2"),
            "{text}"
        );
        assert!(text.contains("pbft_controller_reconcile_duration_seconds_count 1"));
        assert!(text.contains("pbft_controller_reconciliations_total 1"));
        assert!(text.contains("pbft_controller_leader 0"));
    }
}
