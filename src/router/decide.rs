//! What the router does, as a pure function of what it saw: the objects of our driver (as the API
//! server listed them) and which volumes and snapshots the driver on this node holds (as the
//! driver answered). No I/O here, so every rule is a unit test (`tests.rs`).
//!
//! The rules (docs/kubernetes.md, "Group snapshots"):
//! - a VolumeGroupSnapshotContent without a managed-by label whose members are *all* on this
//!   node gets this node's label; members on several nodes, or that the driver could not be
//!   asked about, are recorded and left alone;
//! - a VolumeSnapshotContent without the label whose volume or snapshot is on this node gets it;
//! - the VolumeGroupSnapshotClass carries one label value, so it is handed over: this node
//!   takes it while a group content of this node needs it (csi-snapshotter reads the class
//!   while creating a dynamic group snapshot, and for the status of a pre-provisioned one that
//!   names it), unless another node holds it for a content of its own that is still being
//!   created. The holder names those contents in the class's [`HELD_FOR`] annotation, written
//!   in the same patch as the label (with a resourceVersion precondition), *before* it labels
//!   the content: so a node deciding whether to take the class sees the holder's claim even
//!   before the holder's content carries its label.

use std::collections::{BTreeSet, HashMap};

/// The label csi-snapshotter `--node-deployment` selects its node's objects with.
pub const MANAGED_BY: &str = "snapshot.storage.kubernetes.io/managed-by";

/// The annotation on a VolumeGroupSnapshotClass naming (comma-separated) the group snapshot
/// contents its holder took it for.
pub const HELD_FOR: &str = "loopcsi.dev/held-for";

/// A volume or snapshot id, as the contents name them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Handle {
    Volume(String),
    Snapshot(String),
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handle::Volume(id) => write!(f, "volume {id}"),
            Handle::Snapshot(id) => write!(f, "snapshot {id}"),
        }
    }
}

/// What the driver on this node said about a handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Locality {
    /// The driver holds it.
    Here,
    /// The driver does not (NOT_FOUND, or an id it does not accept).
    NotHere,
    /// The driver could not be asked, or answered something else: decide nothing.
    Unknown(String),
}

/// A VolumeGroupSnapshotContent of our driver.
#[derive(Clone, Debug, Default)]
pub struct GroupContent {
    pub name: String,
    pub resource_version: String,
    pub managed_by: Option<String>,
    pub class: Option<String>,
    /// Dynamic: spec.source.volumeHandles (volumes); pre-provisioned:
    /// spec.source.groupSnapshotHandles.volumeSnapshotHandles (snapshots).
    pub members: Vec<Handle>,
    pub dynamic: bool,
    pub ready: bool,
    /// status.error is set: its creation failed and csi-snapshotter retries it with a backoff.
    pub failed: bool,
    pub deleting: bool,
    /// Seconds since metadata.creationTimestamp (None when unknown).
    pub age_secs: Option<u64>,
}

impl GroupContent {
    /// csi-snapshotter reads the class for this content (getCSIGroupSnapshotInput while it
    /// creates a dynamic group snapshot; the status of a pre-provisioned one naming a class).
    fn needs_class(&self) -> Option<&str> {
        if self.ready || self.deleting {
            return None;
        }
        self.class.as_deref()
    }

    /// Needs the class and is still being created: the holder must keep the class. A failed
    /// one does not block (it is retried when the class is free again), nor one older than the
    /// hold timeout (its node is presumed gone), so no holder blocks a class for ever.
    fn blocks(&self, class: &str, timeout_secs: u64) -> bool {
        self.needs_class() == Some(class)
            && !self.failed
            && self.age_secs.is_none_or(|age| age < timeout_secs)
    }
}

/// A VolumeSnapshotContent of our driver.
#[derive(Clone, Debug, Default)]
pub struct SnapshotContent {
    pub name: String,
    pub resource_version: String,
    pub managed_by: Option<String>,
    /// spec.source.snapshotHandle (pre-provisioned) or spec.source.volumeHandle.
    pub source: Option<Handle>,
}

/// A VolumeGroupSnapshotClass of our driver.
#[derive(Clone, Debug, Default)]
pub struct GroupClass {
    pub name: String,
    pub resource_version: String,
    pub managed_by: Option<String>,
    /// The [`HELD_FOR`] annotation, split.
    pub held_for: BTreeSet<String>,
}

/// Everything the router saw in one pass.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub node: String,
    pub group_contents: Vec<GroupContent>,
    pub contents: Vec<SnapshotContent>,
    pub classes: Vec<GroupClass>,
    pub class_hold_timeout_secs: u64,
}

/// One step for the router to take. The order of a plan matters: a class is taken before the
/// contents it is taken for are labelled, and a failed step stops the steps that depend on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put this node's label on the class, and name the contents it is held for.
    TakeClass {
        name: String,
        resource_version: String,
        held_for: BTreeSet<String>,
    },
    /// Label a group content; `after_class` names the class that must be ours first.
    LabelGroupContent {
        name: String,
        resource_version: String,
        after_class: Option<String>,
    },
    LabelContent {
        name: String,
        resource_version: String,
    },
    /// Nothing done, and why: the router logs it (and records an Event when `warn`).
    Leave {
        kind: Kind,
        name: String,
        reason: String,
        warn: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    GroupContent,
    Content,
    Class,
}

/// The handles the driver must be asked about: those of unlabelled objects only (a labelled
/// object has found its node).
pub fn handles_to_ask(world: &World) -> BTreeSet<Handle> {
    let groups = world
        .group_contents
        .iter()
        .filter(|g| g.managed_by.is_none())
        .flat_map(|g| g.members.iter().cloned());
    let contents = world
        .contents
        .iter()
        .filter(|c| c.managed_by.is_none())
        .filter_map(|c| c.source.clone());
    groups.chain(contents).collect()
}

/// Where the members of a group content are.
enum Members {
    AllHere,
    NoneHere,
    Leave(String, bool),
}

fn members(group: &GroupContent, answers: &HashMap<Handle, Locality>) -> Members {
    if group.members.is_empty() {
        return Members::Leave("it names no member".into(), true);
    }
    let (mut here, mut not_here) = (Vec::new(), Vec::new());
    for handle in &group.members {
        match answers.get(handle) {
            Some(Locality::Here) => here.push(handle.to_string()),
            Some(Locality::NotHere) => not_here.push(handle.to_string()),
            Some(Locality::Unknown(why)) => {
                return Members::Leave(
                    format!("the driver could not say where {handle} is: {why}"),
                    false,
                )
            }
            None => {
                return Members::Leave(format!("the driver was not asked about {handle}"), false)
            }
        }
    }
    match (here.is_empty(), not_here.is_empty()) {
        (false, true) => Members::AllHere,
        (true, _) => Members::NoneHere,
        (false, false) => Members::Leave(
            format!(
                "its members are on several nodes: {} on this node, {} not (loopcsi volumes are \
                 local; a group snapshot must select claims of one node)",
                here.join(", "),
                not_here.join(", ")
            ),
            true,
        ),
    }
}

/// The plan for one pass: classes first, then the contents.
pub fn decide(world: &World, answers: &HashMap<Handle, Locality>) -> Vec<Action> {
    let mut plan = Vec::new();
    // Group contents of this node: already labelled so, or about to be.
    let mut ours: Vec<&GroupContent> = Vec::new();
    let mut to_label: Vec<&GroupContent> = Vec::new();
    for group in &world.group_contents {
        match &group.managed_by {
            Some(node) if *node == world.node => ours.push(group),
            Some(_) => {}
            None => match members(group, answers) {
                Members::AllHere => {
                    ours.push(group);
                    to_label.push(group);
                }
                Members::NoneHere => {}
                Members::Leave(reason, warn) => plan.push(Action::Leave {
                    kind: Kind::GroupContent,
                    name: group.name.clone(),
                    reason,
                    warn,
                }),
            },
        }
    }
    let held = plan_classes(world, &ours, &mut plan);
    for group in to_label {
        let after_class = group.needs_class().map(str::to_owned);
        match after_class.as_deref() {
            Some(class) if !held.contains(class) => plan.push(Action::Leave {
                kind: Kind::GroupContent,
                name: group.name.clone(),
                reason: format!(
                    "its class {class} is held by another node for a group snapshot still being \
                     created; it is labelled once the class is free"
                ),
                warn: false,
            }),
            _ => plan.push(Action::LabelGroupContent {
                name: group.name.clone(),
                resource_version: group.resource_version.clone(),
                after_class,
            }),
        }
    }
    plan_contents(world, answers, &mut plan);
    plan
}

/// Takes (or keeps) each class a group content of this node needs; returns the classes this
/// node holds, or will once the plan's TakeClass steps succeed. A class that does not exist (or
/// is not our driver's) is not held back on: csi-snapshotter reports the missing class itself.
fn plan_classes(world: &World, ours: &[&GroupContent], plan: &mut Vec<Action>) -> BTreeSet<String> {
    let mut needed: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for group in ours {
        if let Some(class) = group.needs_class() {
            needed.entry(class).or_default().insert(group.name.clone());
        }
    }
    let mut held: BTreeSet<String> = needed
        .keys()
        .filter(|name| !world.classes.iter().any(|c| c.name == **name))
        .map(|name| (*name).to_owned())
        .collect();
    for class in &world.classes {
        let Some(for_ours) = needed.remove(class.name.as_str()) else {
            continue;
        };
        let mine = class.managed_by.as_deref() == Some(world.node.as_str());
        if mine && class.held_for == for_ours {
            held.insert(class.name.clone());
            continue;
        }
        let blockers = if mine {
            Vec::new()
        } else {
            blockers(world, class)
        };
        if blockers.is_empty() {
            plan.push(Action::TakeClass {
                name: class.name.clone(),
                resource_version: class.resource_version.clone(),
                held_for: for_ours,
            });
            held.insert(class.name.clone());
        } else {
            plan.push(Action::Leave {
                kind: Kind::Class,
                name: class.name.clone(),
                reason: format!(
                    "node {} holds it for {} (still being created); this node needs it for {}",
                    class.managed_by.as_deref().unwrap_or("?"),
                    blockers.join(", "),
                    for_ours.into_iter().collect::<Vec<_>>().join(", ")
                ),
                warn: false,
            });
        }
    }
    held
}

/// The holder's group contents that keep `class` from another node: those its annotation names
/// and those labelled with the holder's node (a holder that labelled without the annotation),
/// while they are still being created. Nothing when the class has no holder.
fn blockers(world: &World, class: &GroupClass) -> Vec<String> {
    let Some(holder) = class.managed_by.as_deref() else {
        return Vec::new();
    };
    world
        .group_contents
        .iter()
        .filter(|g| match g.managed_by.as_deref() {
            // Claimed before it is labelled: the holder takes the class first.
            None => class.held_for.contains(&g.name),
            Some(node) => node == holder,
        })
        .filter(|g| g.blocks(&class.name, world.class_hold_timeout_secs))
        .map(|g| g.name.clone())
        .collect()
}

/// Single contents (group members, pre-provisioned ones) whose source is on this node.
fn plan_contents(world: &World, answers: &HashMap<Handle, Locality>, plan: &mut Vec<Action>) {
    for content in world.contents.iter().filter(|c| c.managed_by.is_none()) {
        let Some(source) = &content.source else {
            continue;
        };
        match answers.get(source) {
            Some(Locality::Here) => plan.push(Action::LabelContent {
                name: content.name.clone(),
                resource_version: content.resource_version.clone(),
            }),
            Some(Locality::NotHere) => {}
            Some(Locality::Unknown(why)) => plan.push(Action::Leave {
                kind: Kind::Content,
                name: content.name.clone(),
                reason: format!("the driver could not say where {source} is: {why}"),
                warn: false,
            }),
            None => plan.push(Action::Leave {
                kind: Kind::Content,
                name: content.name.clone(),
                reason: format!("the driver was not asked about {source}"),
                warn: false,
            }),
        }
    }
}
