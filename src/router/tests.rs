//! The router's rules, without a cluster: worlds as the API server would list them, answers as
//! the driver would give them, and the plan `decide` makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};

use super::decide::*;

const CLASS: &str = "loopcsi-group-snapshot";

fn vol(id: &str) -> Handle {
    Handle::Volume(id.into())
}

fn snap(id: &str) -> Handle {
    Handle::Snapshot(id.into())
}

/// A dynamic group content of `members`, being created (no status yet).
fn group(name: &str, members: &[&str]) -> GroupContent {
    GroupContent {
        name: name.into(),
        resource_version: format!("rv-{name}"),
        class: Some(CLASS.into()),
        members: members.iter().map(|m| vol(m)).collect(),
        dynamic: true,
        age_secs: Some(5),
        ..Default::default()
    }
}

fn labelled(mut g: GroupContent, node: &str) -> GroupContent {
    g.managed_by = Some(node.into());
    g
}

fn class(holder: Option<&str>, held_for: &[&str]) -> GroupClass {
    GroupClass {
        name: CLASS.into(),
        resource_version: "rv-class".into(),
        managed_by: holder.map(Into::into),
        held_for: held_for.iter().map(|s| s.to_string()).collect(),
    }
}

fn content(name: &str, source: Handle) -> SnapshotContent {
    SnapshotContent {
        name: name.into(),
        resource_version: format!("rv-{name}"),
        managed_by: None,
        source: Some(source),
    }
}

fn world(node: &str, groups: Vec<GroupContent>, classes: Vec<GroupClass>) -> World {
    World {
        node: node.into(),
        group_contents: groups,
        contents: Vec::new(),
        classes,
        class_hold_timeout_secs: 600,
    }
}

/// The driver's answers: `here` on this node, every other handle asked about is not.
fn answers(world: &World, here: &[Handle]) -> HashMap<Handle, Locality> {
    handles_to_ask(world)
        .into_iter()
        .map(|h| {
            let at = if here.contains(&h) {
                Locality::Here
            } else {
                Locality::NotHere
            };
            (h, at)
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn take(held_for: &[&str]) -> Action {
    Action::TakeClass {
        name: CLASS.into(),
        resource_version: "rv-class".into(),
        held_for: set(held_for),
    }
}

fn label_group(name: &str) -> Action {
    Action::LabelGroupContent {
        name: name.into(),
        resource_version: format!("rv-{name}"),
        after_class: Some(CLASS.into()),
    }
}

fn leaves(plan: &[Action]) -> Vec<(Kind, String, String, bool)> {
    plan.iter()
        .filter_map(|a| match a {
            Action::Leave {
                kind,
                name,
                reason,
                warn,
            } => Some((*kind, name.clone(), reason.clone(), *warn)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_group_on_this_node_takes_a_free_class_first_then_is_labelled() {
    let w = world("n1", vec![group("g1", &["a", "b"])], vec![class(None, &[])]);
    let plan = decide(&w, &answers(&w, &[vol("a"), vol("b")]));
    assert_eq!(plan, vec![take(&["g1"]), label_group("g1")]);
}

#[test]
fn a_group_of_another_node_is_left_without_a_word() {
    let w = world("n1", vec![group("g1", &["a", "b"])], vec![class(None, &[])]);
    assert_eq!(decide(&w, &answers(&w, &[])), vec![]);
}

#[test]
fn a_group_across_nodes_is_never_labelled_and_says_why() {
    let w = world("n1", vec![group("g1", &["a", "b"])], vec![class(None, &[])]);
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    let left = leaves(&plan);
    assert_eq!(plan.len(), 1, "{plan:?}");
    let (kind, name, reason, warn) = &left[0];
    assert_eq!(
        (*kind, name.as_str(), *warn),
        (Kind::GroupContent, "g1", true)
    );
    assert!(
        reason.contains("several nodes")
            && reason.contains("volume a")
            && reason.contains("volume b"),
        "{reason}"
    );
}

#[test]
fn a_driver_that_did_not_answer_decides_nothing() {
    let w = world("n1", vec![group("g1", &["a", "b"])], vec![class(None, &[])]);
    let mut got = answers(&w, &[vol("a"), vol("b")]);
    got.insert(vol("b"), Locality::Unknown("connection refused".into()));
    let plan = decide(&w, &got);
    let left = leaves(&plan);
    assert_eq!(plan.len(), 1, "{plan:?}");
    assert!(
        left[0].2.contains("connection refused") && !left[0].3,
        "{left:?}"
    );
}

#[test]
fn a_group_without_members_is_recorded() {
    let w = world("n1", vec![group("g1", &[])], vec![class(None, &[])]);
    let plan = decide(&w, &answers(&w, &[]));
    assert!(
        matches!(&plan[..], [Action::Leave { warn: true, .. }]),
        "{plan:?}"
    );
}

#[test]
fn a_labelled_group_is_never_relabelled_nor_asked_about() {
    let w = world(
        "n1",
        vec![
            labelled(group("g1", &["a"]), "n2"),
            labelled(group("g2", &["b"]), "n1"),
        ],
        vec![class(Some("n1"), &["g2"])],
    );
    assert!(handles_to_ask(&w).is_empty());
    assert_eq!(decide(&w, &HashMap::new()), vec![]);
}

#[test]
fn the_holder_keeps_its_class_and_updates_whom_it_holds_it_for() {
    let w = world(
        "n1",
        vec![labelled(group("g1", &["a"]), "n1"), group("g2", &["b"])],
        vec![class(Some("n1"), &["g1"])],
    );
    let plan = decide(&w, &answers(&w, &[vol("b")]));
    assert_eq!(plan, vec![take(&["g1", "g2"]), label_group("g2")]);
}

#[test]
fn a_class_held_for_a_group_still_being_created_is_not_taken() {
    // n2 took the class for g2 and has not labelled g2 yet: its claim alone keeps n1 off.
    let w = world(
        "n1",
        vec![group("g1", &["a"]), group("g2", &["b"])],
        vec![class(Some("n2"), &["g2"])],
    );
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    let left = leaves(&plan);
    assert_eq!(left.len(), 2, "{plan:?}");
    assert_eq!((left[0].0, left[0].1.as_str()), (Kind::Class, CLASS));
    assert!(
        left[0].2.contains("node n2") && left[0].2.contains("g2"),
        "{}",
        left[0].2
    );
    assert_eq!((left[1].0, left[1].1.as_str()), (Kind::GroupContent, "g1"));
    assert!(!plan.iter().any(|a| matches!(
        a,
        Action::TakeClass { .. } | Action::LabelGroupContent { .. }
    )));
}

#[test]
fn a_class_is_handed_over_once_the_holders_groups_are_ready() {
    let mut done = labelled(group("g2", &["b"]), "n2");
    done.ready = true;
    let w = world(
        "n1",
        vec![group("g1", &["a"]), done],
        vec![class(Some("n2"), &["g2"])],
    );
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    assert_eq!(plan, vec![take(&["g1"]), label_group("g1")]);
}

#[test]
fn a_holder_whose_groups_failed_were_deleted_or_went_stale_does_not_block() {
    let mut failed = labelled(group("g2", &["b"]), "n2");
    failed.failed = true;
    let mut stale = labelled(group("g3", &["c"]), "n2");
    stale.age_secs = Some(601);
    let mut deleting = labelled(group("g4", &["d"]), "n2");
    deleting.deleting = true;
    let w = world(
        "n1",
        vec![group("g1", &["a"]), failed, stale, deleting],
        // g5 was deleted: the claim names a content that no longer exists.
        vec![class(Some("n2"), &["g2", "g3", "g4", "g5"])],
    );
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    assert_eq!(plan, vec![take(&["g1"]), label_group("g1")]);
}

#[test]
fn a_holder_that_labelled_without_a_claim_still_blocks() {
    let w = world(
        "n1",
        vec![group("g1", &["a"]), labelled(group("g2", &["b"]), "n2")],
        vec![class(Some("n2"), &[])],
    );
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    assert!(
        !plan.iter().any(|a| matches!(a, Action::TakeClass { .. })),
        "{plan:?}"
    );
}

#[test]
fn another_nodes_group_labelled_for_a_third_node_does_not_block() {
    // The claim names g2, but g2 is labelled for n3, not for the holder n2.
    let w = world(
        "n1",
        vec![group("g1", &["a"]), labelled(group("g2", &["b"]), "n3")],
        vec![class(Some("n2"), &["g2"])],
    );
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    assert_eq!(plan, vec![take(&["g1"]), label_group("g1")]);
}

#[test]
fn two_nodes_deciding_on_the_same_world_never_both_keep_the_class() {
    // Both see a free class: both plan to take it, with the same resourceVersion, so the API
    // server lets exactly one patch through (the other gets a conflict and its content waits).
    let groups = vec![group("g1", &["a"]), group("g2", &["b"])];
    let w1 = world("n1", groups.clone(), vec![class(None, &[])]);
    let w2 = world("n2", groups, vec![class(None, &[])]);
    let p1 = decide(&w1, &answers(&w1, &[vol("a")]));
    let p2 = decide(&w2, &answers(&w2, &[vol("b")]));
    assert_eq!(p1[0], take(&["g1"]));
    assert_eq!(p2[0], take(&["g2"]));
    // After n1 won: n2 sees n1's claim and waits.
    let w2 = world(
        "n2",
        w1.group_contents.clone(),
        vec![class(Some("n1"), &["g1"])],
    );
    let p2 = decide(&w2, &answers(&w2, &[vol("b")]));
    assert!(
        !p2.iter().any(|a| matches!(
            a,
            Action::TakeClass { .. } | Action::LabelGroupContent { .. }
        )),
        "{p2:?}"
    );
}

#[test]
fn a_ready_group_or_one_without_a_class_is_labelled_without_the_class() {
    let mut ready = group("g1", &["a"]);
    ready.ready = true;
    let mut pre = group("g2", &[]);
    pre.class = None;
    pre.dynamic = false;
    pre.members = vec![snap("s1"), snap("s2")];
    let w = world("n1", vec![ready, pre], vec![class(Some("n2"), &["gx"])]);
    let plan = decide(&w, &answers(&w, &[vol("a"), snap("s1"), snap("s2")]));
    let labels: Vec<_> = plan
        .iter()
        .map(|a| match a {
            Action::LabelGroupContent {
                name, after_class, ..
            } => (name.as_str(), after_class.clone()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(labels, vec![("g1", None), ("g2", None)]);
}

#[test]
fn a_pre_provisioned_group_naming_a_class_needs_it_until_ready() {
    let mut pre = group("g1", &[]);
    pre.dynamic = false;
    pre.members = vec![snap("s1")];
    let w = world("n1", vec![pre], vec![class(None, &[])]);
    let plan = decide(&w, &answers(&w, &[snap("s1")]));
    assert_eq!(plan, vec![take(&["g1"]), label_group("g1")]);
}

#[test]
fn a_missing_class_does_not_hold_the_group_back() {
    let w = world("n1", vec![group("g1", &["a"])], vec![]);
    let plan = decide(&w, &answers(&w, &[vol("a")]));
    assert_eq!(plan, vec![label_group("g1")]);
}

#[test]
fn snapshot_contents_on_this_node_are_labelled_others_left() {
    let mut w = world("n1", vec![], vec![]);
    let mut already = content("c3", vol("a"));
    already.managed_by = Some("n2".into());
    w.contents = vec![
        content("c1", vol("a")),
        content("c2", snap("s9")),
        already,
        SnapshotContent {
            name: "c4".into(),
            ..Default::default()
        },
        content("c5", snap("s1")),
    ];
    assert_eq!(
        handles_to_ask(&w),
        [vol("a"), snap("s1"), snap("s9")].into_iter().collect()
    );
    let plan = decide(&w, &answers(&w, &[vol("a"), snap("s1")]));
    let names: Vec<_> = plan
        .iter()
        .map(|a| match a {
            Action::LabelContent { name, .. } => name.as_str(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(names, vec!["c1", "c5"]);
}

#[test]
fn a_content_the_driver_could_not_place_is_left_for_the_next_pass() {
    let mut w = world("n1", vec![], vec![]);
    w.contents = vec![content("c1", vol("a"))];
    let got = HashMap::from([(vol("a"), Locality::Unknown("deadline".into()))]);
    let plan = decide(&w, &got);
    assert!(
        matches!(
            &plan[..],
            [Action::Leave {
                kind: Kind::Content,
                warn: false,
                ..
            }]
        ),
        "{plan:?}"
    );
}
