//! `loopcsi route-snapshots`: the group snapshot router, an outer layer like `service/` (it
//! talks to the Kubernetes API server and to the driver's CSI socket, never to `volume/`).
//!
//! Why it exists: csi-snapshotter v8.7.0 with `--node-deployment` sees only the
//! VolumeSnapshotContents, VolumeGroupSnapshotContents and VolumeGroupSnapshotClasses labelled
//! `snapshot.storage.kubernetes.io/managed-by=<its node>`, and the snapshot-controller labels
//! only the content of a single snapshot. The router, one per node, puts its node's label on
//! the objects whose volumes or snapshots the driver on its node holds, and hands the class
//! over between nodes (`decide`, docs/kubernetes.md "Group snapshots").
//!
//! How: three watches (with re-list and backoff, `kube::runtime::watcher`) fill three caches;
//! a change, or the resync tick, starts a pass over the caches: ask the driver about the
//! unlabelled objects, `decide`, apply the plan (`apply`). Every patch carries the
//! resourceVersion the decision saw, so a decision made on stale data fails (409) and the
//! next pass decides again.

mod apply;
pub mod decide;
pub mod driver;
pub mod objects;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use tokio_stream::{Stream, StreamExt};

use crate::config::RouteArgs;
use decide::{Handle, Locality, World};

/// How long a pass waits after a change for the changes that come with it (a group snapshot
/// makes several objects at once), so one pass decides on all of them.
const SETTLE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Args(#[from] crate::error::Error),
    #[error("no Kubernetes client configuration (in a pod: the service account): {0}")]
    Kube(#[from] kube::Error),
    #[error("the watch of {0} ended")]
    WatchEnded(&'static str),
}

/// The caches of the three kinds the router watches.
struct Caches {
    group_contents: Store<DynamicObject>,
    contents: Store<DynamicObject>,
    classes: Store<DynamicObject>,
}

/// Runs the router until `shutdown` resolves.
pub async fn run(args: RouteArgs, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    args.validate()?;
    let client = kube::Client::try_default().await?;
    let driver = driver::Driver::new(args.socket_path()?);
    let (group_contents, w1) = watch(
        &client,
        "VolumeGroupSnapshotContent",
        objects::group_contents(),
    );
    let (contents, w2) = watch(&client, "VolumeSnapshotContent", objects::contents());
    let (classes, w3) = watch(
        &client,
        "VolumeGroupSnapshotClass",
        objects::group_classes(),
    );
    let caches = Caches {
        group_contents,
        contents,
        classes,
    };
    let mut changes = w1.merge(w2).merge(w3);
    let mut applier = apply::Applier::new(client, &args.node_id);
    let mut resync = tokio::time::interval(Duration::from_secs(args.resync_interval));
    let mut pending: Option<tokio::time::Instant> = None;
    // The kinds whose watch has listed every object once: a pass on a partial view could hand
    // a class over that another node's content still needs.
    let mut listed = BTreeSet::new();
    tracing::info!(node.id = %args.node_id, driver.name = %args.driver_name, "routing group snapshots");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            change = changes.next() => match change {
                Some((kind, init_done)) => {
                    if init_done {
                        listed.insert(kind);
                    }
                    pending.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
                }
                None => return Err(Error::WatchEnded("the snapshot objects")),
            },
            _ = resync.tick() => {
                pending.get_or_insert_with(tokio::time::Instant::now);
            }
            () = tokio::time::sleep_until(pending.unwrap_or_else(tokio::time::Instant::now)), if pending.is_some() => {
                pending = None;
                if listed.len() == 3 {
                    pass(&args, &caches, &driver, &mut applier).await;
                }
            }
        }
    }
}

/// A cache of one kind and the stream of its changes: the kind's name, and whether the change
/// ends a full listing. The stream must be polled for the cache to fill. Watch errors are
/// logged and retried with the watcher's backoff: a missing CRD (snapshots not installed yet)
/// is not fatal.
fn watch(
    client: &kube::Client,
    kind: &'static str,
    resource: ApiResource,
) -> (
    Store<DynamicObject>,
    impl Stream<Item = (&'static str, bool)> + Unpin,
) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let writer = reflector::store::Writer::new(resource);
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| match event {
            Ok(event) => Some((kind, matches!(event, watcher::Event::InitDone))),
            Err(err) => {
                tracing::warn!(kind, error = %err, "watch failed; retrying");
                None
            }
        });
    (reader, Box::pin(stream))
}

/// One pass: what the caches hold, what the driver says, what to do.
async fn pass(
    args: &RouteArgs,
    caches: &Caches,
    driver: &driver::Driver,
    applier: &mut apply::Applier,
) {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let ours = |store: &Store<DynamicObject>| {
        let mut objects: Vec<_> = store
            .state()
            .into_iter()
            .filter(|o| objects::is_drivers(o, &args.driver_name))
            .collect();
        // A stable order, so the plan (and the log) does not depend on the cache's.
        objects.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        objects
    };
    let world = World {
        node: args.node_id.clone(),
        group_contents: ours(&caches.group_contents)
            .iter()
            .map(|o| objects::group_content(o, now))
            .collect(),
        contents: ours(&caches.contents)
            .iter()
            .map(|o| objects::content(o))
            .collect(),
        classes: ours(&caches.classes)
            .iter()
            .map(|o| objects::group_class(o))
            .collect(),
        class_hold_timeout_secs: args.class_hold_timeout,
    };
    let mut answers: HashMap<Handle, Locality> = HashMap::new();
    for handle in decide::handles_to_ask(&world) {
        let at = driver.locate(&handle).await;
        answers.insert(handle, at);
    }
    let plan = decide::decide(&world, &answers);
    applier.apply(plan).await;
}

#[cfg(test)]
mod tests;
