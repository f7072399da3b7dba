//! Prometheus metrics, served as OpenMetrics text at `/metrics` on `--metrics-address`.
//!
//! Counters and histograms are updated as RPCs finish and reconciliation rounds end. Everything
//! the kernel and the pool already know (volumes by state, pool bytes, loop devices) is read at
//! scrape time rather than mirrored, so a scrape is always the truth of that instant.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::volume::reconcile::ReconcileReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

/// What a scrape reads from the pool and the kernel (defined by the domain, which reads it).
pub use crate::volume::status::Inventory;

pub struct Metrics {
    registry: Registry,
    requests: Family<RpcLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    reconcile_actions: Family<ActionLabels, Counter>,
    volumes: Family<StateLabels, Gauge>,
    snapshots: Gauge,
    loop_devices: Gauge,
    pool_capacity: Gauge,
    pool_available: Gauge,
    allocated: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("loopcsi");
        let requests = Family::<RpcLabels, Counter>::default();
        // 100 µs to ~6.5 s.
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 9))
        });
        let reconcile_actions = Family::<ActionLabels, Counter>::default();
        let volumes = Family::<StateLabels, Gauge>::default();
        let (snapshots, loop_devices) = (Gauge::default(), Gauge::default());
        let (pool_capacity, pool_available, allocated) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "rpc_requests",
            "CSI RPCs answered, by method and gRPC code",
            requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "CSI RPC latency, by method",
            latency.clone(),
        );
        registry.register(
            "reconciler_actions",
            "Reconciliation actions: repair, report (unrepairable drift), collect (orphans)",
            reconcile_actions.clone(),
        );
        registry.register(
            "volumes",
            "Volumes by state: created (all), staged, published",
            volumes.clone(),
        );
        registry.register("snapshots", "Snapshots in the pool", snapshots.clone());
        registry.register(
            "loop_devices_attached",
            "Loop devices backed by pool images",
            loop_devices.clone(),
        );
        registry.register(
            "pool_capacity_bytes",
            "Size of the pool's file system",
            pool_capacity.clone(),
        );
        registry.register(
            "pool_available_bytes",
            "Free space of the pool's file system",
            pool_available.clone(),
        );
        registry.register(
            "pool_allocated_bytes",
            "Bytes allocated by volume and snapshot images",
            allocated.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            reconcile_actions,
            volumes,
            snapshots,
            loop_devices,
            pool_capacity,
            pool_available,
            allocated,
        })
    }

    /// Records one answered RPC.
    pub fn observe_rpc(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(seconds);
    }

    /// Records what a reconciliation round did.
    pub fn observe_reconcile(&self, report: &ReconcileReport) {
        for (action, count) in [
            ("repair", report.repaired.len()),
            ("report", report.unrepairable.len()),
            ("collect", report.collected.len()),
        ] {
            self.reconcile_actions
                .get_or_create(&ActionLabels {
                    action: action.to_string(),
                })
                .inc_by(count as u64);
        }
    }

    /// The OpenMetrics text of a scrape, with the gauges set from `inventory`.
    pub fn render(&self, inventory: Option<&Inventory>) -> String {
        if let Some(inv) = inventory {
            let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for (state, value) in [
                ("created", inv.volumes),
                ("staged", inv.staged),
                ("published", inv.published),
            ] {
                self.volumes
                    .get_or_create(&StateLabels {
                        state: state.to_string(),
                    })
                    .set(signed(value));
            }
            self.snapshots.set(signed(inv.snapshots));
            self.loop_devices.set(signed(inv.loop_devices));
            self.pool_capacity.set(signed(inv.pool_capacity_bytes));
            self.pool_available.set(signed(inv.pool_available_bytes));
            self.allocated.set(signed(inv.allocated_bytes));
        }
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %err, "encoding metrics");
        }
        text
    }
}
