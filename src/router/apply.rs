//! Carries out a plan: merge patches of labels (and of the class's claim annotation), each with
//! the resourceVersion the decision saw as a precondition; the log lines; and an Event on an
//! object the router refuses to route (members on several nodes), recorded once per reason.

use std::collections::{BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::json;

use super::decide::{Action, Kind, HELD_FOR, MANAGED_BY};
use super::objects;

/// The field manager of the router's patches.
const MANAGER: &str = "loopcsi-router";

pub struct Applier {
    client: kube::Client,
    node: String,
    recorder: Recorder,
    /// What the last pass left alone, and why: each is logged (and recorded) when it changes,
    /// not on every pass.
    left: HashMap<(String, String), String>,
}

impl Applier {
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(node.into()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node: node.into(),
            left: HashMap::new(),
        }
    }

    /// Applies `plan` in order. A class this node failed to take holds back the group contents
    /// that wait for it: they are decided again at the next pass.
    pub async fn apply(&mut self, plan: Vec<Action>) {
        let mut not_taken: HashSet<String> = HashSet::new();
        let mut left = HashMap::new();
        for action in plan {
            match action {
                Action::TakeClass {
                    name,
                    resource_version,
                    held_for,
                } => {
                    let ok = self.take_class(&name, &resource_version, &held_for).await;
                    if !ok {
                        not_taken.insert(name);
                    }
                }
                Action::LabelGroupContent {
                    name,
                    resource_version,
                    after_class,
                } => {
                    if after_class.is_some_and(|c| not_taken.contains(&c)) {
                        continue;
                    }
                    let resource = objects::group_contents();
                    self.label(&resource, &name, &resource_version).await;
                }
                Action::LabelContent {
                    name,
                    resource_version,
                } => {
                    self.label(&objects::contents(), &name, &resource_version)
                        .await;
                }
                Action::Leave {
                    kind,
                    name,
                    reason,
                    warn,
                } => {
                    let key = (format!("{kind:?}"), name);
                    if self.left.get(&key) != Some(&reason) {
                        self.report(kind, &key.1, &reason, warn).await;
                    }
                    left.insert(key, reason);
                }
            }
        }
        self.left = left;
    }

    /// Labels a content for this node, if it is still the version the decision saw.
    async fn label(&self, resource: &ApiResource, name: &str, resource_version: &str) {
        let patch = json!({"metadata": {
            "resourceVersion": resource_version,
            "labels": {MANAGED_BY: self.node},
        }});
        if self.patch(resource, name, patch).await {
            tracing::info!(kind = %resource.kind, name, node.id = %self.node, "labelled for this node's csi-snapshotter");
        }
    }

    /// Takes the class (or renews the claim), if it is still the version the decision saw:
    /// of two nodes deciding on the same version, exactly one succeeds.
    async fn take_class(
        &self,
        name: &str,
        resource_version: &str,
        held_for: &BTreeSet<String>,
    ) -> bool {
        let claim = held_for.iter().cloned().collect::<Vec<_>>().join(",");
        let patch = json!({"metadata": {
            "resourceVersion": resource_version,
            "labels": {MANAGED_BY: self.node},
            "annotations": {HELD_FOR: claim},
        }});
        let ok = self.patch(&objects::group_classes(), name, patch).await;
        if ok {
            tracing::info!(kind = "VolumeGroupSnapshotClass", name, held_for = %claim, node.id = %self.node, "class held by this node");
        }
        ok
    }

    async fn patch(&self, resource: &ApiResource, name: &str, patch: serde_json::Value) -> bool {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), resource);
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        match api.patch(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => true,
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Someone changed it since the decision (another node took the class first, the
                // snapshot-controller updated the content): the change's event starts a new pass.
                tracing::info!(kind = %resource.kind, name, "changed since the decision; deciding again");
                false
            }
            Err(err) => {
                tracing::warn!(kind = %resource.kind, name, error = %err, "patch failed; retried at the next pass");
                false
            }
        }
    }

    /// Logs why an object was left alone; a refusal (`warn`) is also an Event on the object,
    /// where `kubectl describe` shows it.
    async fn report(&self, kind: Kind, name: &str, reason: &str, warn: bool) {
        let (kind_name, resource) = match kind {
            Kind::GroupContent => ("VolumeGroupSnapshotContent", objects::group_contents()),
            Kind::Content => ("VolumeSnapshotContent", objects::contents()),
            Kind::Class => ("VolumeGroupSnapshotClass", objects::group_classes()),
        };
        if !warn {
            tracing::info!(kind = kind_name, name, reason, "not routed yet");
            return;
        }
        tracing::warn!(kind = kind_name, name, reason, "not routed");
        let reference = ObjectReference {
            api_version: Some(resource.api_version.clone()),
            kind: Some(kind_name.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "NotRouted".into(),
            note: Some(format!(
                "loopcsi on node {}: not labelled for this node: {reason}",
                self.node
            )),
            action: "Route".into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(kind = kind_name, name, error = %err, "could not record an Event");
        }
    }
}
