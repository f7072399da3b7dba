//! The snapshot CRDs as the router reads them: their API resources (external-snapshotter v8's
//! `snapshot.storage.k8s.io/v1` and `groupsnapshot.storage.k8s.io/v1`), and the few fields of
//! each object the decisions need, read from untyped JSON (`DynamicObject`), so the router
//! depends on no generated client for the CRDs. A field of an unexpected type reads as absent.

use std::collections::BTreeSet;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

use super::decide::{GroupClass, GroupContent, Handle, SnapshotContent, HELD_FOR, MANAGED_BY};

pub fn group_contents() -> ApiResource {
    resource(
        "groupsnapshot.storage.k8s.io",
        "VolumeGroupSnapshotContent",
        "volumegroupsnapshotcontents",
    )
}

pub fn group_classes() -> ApiResource {
    resource(
        "groupsnapshot.storage.k8s.io",
        "VolumeGroupSnapshotClass",
        "volumegroupsnapshotclasses",
    )
}

pub fn contents() -> ApiResource {
    resource(
        "snapshot.storage.k8s.io",
        "VolumeSnapshotContent",
        "volumesnapshotcontents",
    )
}

fn resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
}

fn label(obj: &DynamicObject) -> Option<String> {
    obj.metadata.labels.as_ref()?.get(MANAGED_BY).cloned()
}

fn str_at<'a>(obj: &'a DynamicObject, path: &[&str]) -> Option<&'a str> {
    at(obj, path)?.as_str()
}

fn at<'a>(obj: &'a DynamicObject, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(&obj.data, |v, key| v.get(key))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn name(obj: &DynamicObject) -> String {
    obj.metadata.name.clone().unwrap_or_default()
}

fn resource_version(obj: &DynamicObject) -> String {
    obj.metadata.resource_version.clone().unwrap_or_default()
}

/// Whether `obj` belongs to `driver`: spec.driver for contents, driver for classes.
pub fn is_drivers(obj: &DynamicObject, driver: &str) -> bool {
    str_at(obj, &["spec", "driver"]).or_else(|| str_at(obj, &["driver"])) == Some(driver)
}

/// A VolumeGroupSnapshotContent; `now` is the current time in Unix seconds.
pub fn group_content(obj: &DynamicObject, now: i64) -> GroupContent {
    let volumes = strings(at(obj, &["spec", "source", "volumeHandles"]));
    let snapshots = strings(at(
        obj,
        &[
            "spec",
            "source",
            "groupSnapshotHandles",
            "volumeSnapshotHandles",
        ],
    ));
    let dynamic = !volumes.is_empty();
    let members = if dynamic {
        volumes.into_iter().map(Handle::Volume).collect()
    } else {
        snapshots.into_iter().map(Handle::Snapshot).collect()
    };
    GroupContent {
        name: name(obj),
        resource_version: resource_version(obj),
        managed_by: label(obj),
        class: str_at(obj, &["spec", "volumeGroupSnapshotClassName"]).map(str::to_owned),
        members,
        dynamic,
        ready: at(obj, &["status", "readyToUse"]).and_then(Value::as_bool) == Some(true),
        failed: at(obj, &["status", "error"]).is_some_and(|e| !e.is_null()),
        deleting: obj.metadata.deletion_timestamp.is_some(),
        age_secs: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| u64::try_from(now - t.0.as_second()).unwrap_or(0)),
    }
}

/// A VolumeSnapshotContent: a pre-provisioned one names its snapshot, a dynamic one (a group
/// member included) its volume.
pub fn content(obj: &DynamicObject) -> SnapshotContent {
    let source = str_at(obj, &["spec", "source", "snapshotHandle"])
        .map(|s| Handle::Snapshot(s.to_owned()))
        .or_else(|| {
            str_at(obj, &["spec", "source", "volumeHandle"]).map(|v| Handle::Volume(v.to_owned()))
        });
    SnapshotContent {
        name: name(obj),
        resource_version: resource_version(obj),
        managed_by: label(obj),
        source,
    }
}

pub fn group_class(obj: &DynamicObject) -> GroupClass {
    let held_for: BTreeSet<String> = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HELD_FOR))
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    GroupClass {
        name: name(obj),
        resource_version: resource_version(obj),
        managed_by: label(obj),
        held_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> DynamicObject {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_dynamic_group_content_reads_its_volumes_class_and_state() {
        let obj = object(serde_json::json!({
            "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotContent",
            "metadata": {"name": "g", "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"driver": "loopcsi.dev", "volumeGroupSnapshotClassName": "c",
                     "source": {"volumeHandles": ["v1", "v2"]}},
            "status": {"error": {"message": "boom"}}
        }));
        let g = group_content(&obj, 1_767_225_600 + 30);
        assert!(is_drivers(&obj, "loopcsi.dev") && !is_drivers(&obj, "other"));
        assert_eq!(
            g.members,
            vec![Handle::Volume("v1".into()), Handle::Volume("v2".into())]
        );
        assert_eq!(
            (g.class.as_deref(), g.dynamic, g.ready, g.failed),
            (Some("c"), true, false, true)
        );
        assert_eq!(
            (g.age_secs, g.resource_version.as_str(), g.managed_by),
            (Some(30), "7", None)
        );
    }

    #[test]
    fn a_pre_provisioned_group_content_reads_its_snapshots_and_label() {
        let obj = object(serde_json::json!({
            "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotContent",
            "metadata": {"name": "g", "labels": {MANAGED_BY: "n1"}},
            "spec": {"driver": "loopcsi.dev", "source": {"groupSnapshotHandles":
                {"volumeGroupSnapshotHandle": "gs", "volumeSnapshotHandles": ["s1"]}}},
            "status": {"readyToUse": true}
        }));
        let g = group_content(&obj, 0);
        assert_eq!(g.members, vec![Handle::Snapshot("s1".into())]);
        assert_eq!(
            (g.dynamic, g.ready, g.managed_by.as_deref()),
            (false, true, Some("n1"))
        );
    }

    #[test]
    fn a_content_and_a_class_read_their_source_and_holder() {
        let obj = object(serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "c"}, "spec": {"driver": "loopcsi.dev", "source": {"snapshotHandle": "s"}}
        }));
        assert_eq!(content(&obj).source, Some(Handle::Snapshot("s".into())));
        let obj = object(serde_json::json!({
            "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotClass",
            "metadata": {"name": "k", "labels": {MANAGED_BY: "n2"}, "annotations": {HELD_FOR: "a,b"}},
            "driver": "loopcsi.dev", "deletionPolicy": "Delete"
        }));
        let class = group_class(&obj);
        assert!(is_drivers(&obj, "loopcsi.dev"));
        assert_eq!(class.managed_by.as_deref(), Some("n2"));
        assert_eq!(
            class.held_for,
            ["a".to_owned(), "b".to_owned()].into_iter().collect()
        );
    }
}
