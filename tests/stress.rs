//! Stress: races on one volume, many volumes at once, and a full pool (run as root; real loop
//! devices, mkfs and mounts).
//!
//! Races are checked by outcome, never by timing: every call either succeeds, is ABORTED
//! (another operation on the volume is in flight) or fails with the spec's code for the state
//! the other call left behind; and whatever the interleaving, the kernel (loop devices, mount
//! table) and ListVolumes must agree with what the calls that succeeded imply.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use loopcsi::csi;
use loopcsi::csi::controller_client::ControllerClient;
use loopcsi::csi::node_client::NodeClient;
use loopcsi::host::{loopdev, mount};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Rounds of each race.
const ROUNDS: usize = 16;

// ---- clients that can be cloned into concurrent calls ----

#[derive(Clone)]
struct Api {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Api {
    fn of(d: &TestDriver) -> Self {
        Api {
            controller: d.controller.clone(),
            node: d.node.clone(),
        }
    }

    async fn create(&mut self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        self.controller.create_volume(req).await.map(|r| {
            r.into_inner()
                .volume
                .expect("CreateVolume returns a volume")
        })
    }

    async fn delete(&mut self, id: &str) -> Result<(), Status> {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: &csi::VolumeCapability,
    ) -> Result<(), Status> {
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), Status> {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(drop)
    }

    async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: &csi::VolumeCapability,
    ) -> Result<(), Status> {
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(drop)
    }

    async fn capacity(&mut self, caps: Vec<csi::VolumeCapability>) -> csi::GetCapacityResponse {
        self.controller
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: caps,
                ..Default::default()
            })
            .await
            .expect("GetCapacity answers")
            .into_inner()
    }

    /// Every volume id ListVolumes reports (all pages).
    async fn list(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 7,
                    starting_token: token,
                })
                .await
                .expect("ListVolumes answers")
                .into_inner();
            ids.extend(
                page.entries
                    .into_iter()
                    .map(|e| e.volume.expect("entry has a volume").volume_id),
            );
            if page.next_token.is_empty() {
                return ids;
            }
            token = page.next_token;
        }
    }
}

/// Retries a call while it is ABORTED (an operation on the volume is still in flight), as a CO
/// does. Bounded, so a guard that is never released fails the test instead of hanging it.
macro_rules! settle {
    ($call:expr) => {{
        let mut tries = 0u32;
        loop {
            match $call.await {
                Err(status) if status.code() == Code::Aborted && tries < 10_000 => {
                    tries += 1;
                    tokio::task::yield_now().await;
                }
                other => break other,
            }
        }
    }};
}

/// Runs two calls concurrently, polling `a` first or `b` first.
async fn race<A: Future, B: Future>(a_first: bool, a: A, b: B) -> (A::Output, B::Output) {
    if a_first {
        tokio::join!(a, b)
    } else {
        let (rb, ra) = tokio::join!(b, a);
        (ra, rb)
    }
}

/// True when the call took effect (OK); false when it was ABORTED or failed with one of
/// `allowed`; any other outcome fails the test.
#[track_caller]
fn took_effect<T>(what: &str, result: &Result<T, Status>, allowed: &[Code]) -> bool {
    match result {
        Ok(_) => true,
        Err(s) if s.code() == Code::Aborted || allowed.contains(&s.code()) => false,
        Err(s) => panic!(
            "{what}: unexpected {:?} (allowed: OK, Aborted, {allowed:?}): {}",
            s.code(),
            s.message()
        ),
    }
}

fn code_of<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "Ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// How often each combination of outcomes happened (printed, so a run shows that the races
/// really collided).
#[derive(Default)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, outcome: String) {
        *self.0.entry(outcome).or_default() += 1;
    }
    fn print(&self, test: &str) {
        eprintln!("{test}: outcomes {:?}", self.0);
    }
}

// ---- what the kernel shows ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fs,
    Block,
}

impl Kind {
    fn cap(self) -> csi::VolumeCapability {
        match self {
            Kind::Fs => mount_cap("ext4", snw()),
            Kind::Block => block_cap(snw()),
        }
    }
}

/// Loop devices attached to the volume's image.
fn devices_of(d: &TestDriver, id: &str) -> Vec<loopdev::LoopDevice> {
    let image = d.image_path(id);
    loopdev::attached()
        .unwrap()
        .into_iter()
        .filter(|(_, file)| *file == image)
        .map(|(dev, _)| dev)
        .collect()
}

fn mount_count(table: &[mount::MountEntry], path: &Path) -> usize {
    table.iter().filter(|m| m.mount_point == path).count()
}

fn mounted(path: &Path) -> bool {
    mount_count(&mount::mounts().unwrap(), path) > 0
}

/// The volume's node records directory (staged.json, target-*.json).
fn node_record(d: &TestDriver, id: &str) -> PathBuf {
    d.state_dir().join("node").join(id)
}

/// What the kernel must show for one volume (see `assert_kernel`).
#[derive(Default)]
struct Expect<'a> {
    staged_at: Option<&'a Path>,
    published: &'a [&'a Path],
    unmounted: &'a [&'a Path],
    gone: &'a [&'a Path],
}

/// Asserts what the kernel shows for volume `id`:
/// - `staged_at`: staged there (exactly one loop device; a file system mounted exactly there),
///   or not staged at all (no loop device);
/// - `published`: the targets where it is bound, each exactly once, and nowhere else;
/// - `unmounted`: paths with no mount at all;
/// - `gone`: targets that are neither mounted nor exist (unpublish deletes them).
fn assert_kernel(d: &TestDriver, id: &str, kind: Kind, want: Expect<'_>, ctx: &str) {
    let Expect {
        staged_at,
        published,
        unmounted,
        gone,
    } = want;
    let devices = devices_of(d, id);
    let table = mount::mounts().unwrap();
    match staged_at {
        None => {
            assert!(
                devices.is_empty(),
                "{ctx}: the volume is not staged, yet attached to {devices:?}"
            );
            assert!(published.is_empty(), "{ctx}: test bug: published unstaged");
            assert!(
                !node_record(d, id).exists(),
                "{ctx}: a node record is left for a volume that is not staged"
            );
        }
        Some(staging) => {
            assert_eq!(
                devices.len(),
                1,
                "{ctx}: a staged volume has exactly one loop device: {devices:?}"
            );
            let numbers = devices[0].dev_numbers().unwrap();
            let mut want: Vec<PathBuf> = published.iter().map(|p| p.to_path_buf()).collect();
            match kind {
                Kind::Fs => {
                    want.push(staging.to_path_buf());
                    want.sort();
                    let mut points: Vec<PathBuf> = table
                        .iter()
                        .filter(|m| (m.major, m.minor) == numbers)
                        .map(|m| m.mount_point.clone())
                        .collect();
                    points.sort();
                    assert_eq!(
                        points, want,
                        "{ctx}: mounts of the volume's file system (staging + targets, each once)"
                    );
                }
                Kind::Block => {
                    want.sort();
                    assert_eq!(
                        mount_count(&table, staging),
                        0,
                        "{ctx}: a block volume's staging path is not mounted"
                    );
                    assert!(
                        !table.iter().any(|m| (m.major, m.minor) == numbers),
                        "{ctx}: nothing mounts a block volume's device"
                    );
                    let rdev = nix::sys::stat::makedev(numbers.0.into(), numbers.1.into());
                    let mut binds: Vec<PathBuf> = table
                        .iter()
                        .filter(|m| m.mount_point.starts_with(d.root()))
                        .filter(|m| {
                            std::fs::metadata(&m.mount_point).is_ok_and(|md| {
                                md.file_type().is_block_device() && md.rdev() == rdev
                            })
                        })
                        .map(|m| m.mount_point.clone())
                        .collect();
                    binds.sort();
                    assert_eq!(binds, want, "{ctx}: binds of the volume's device node");
                }
            }
            let record = std::fs::read_to_string(node_record(d, id).join("staged.json"))
                .unwrap_or_else(|e| panic!("{ctx}: a staged volume has a node record: {e}"));
            assert!(
                record.contains(&*staging.to_string_lossy()),
                "{ctx}: the node record names the staging path: {record}"
            );
        }
    }
    for path in published {
        assert_eq!(
            mount_count(&table, path),
            1,
            "{ctx}: {} is mounted exactly once",
            path.display()
        );
    }
    for path in unmounted {
        assert_eq!(
            mount_count(&table, path),
            0,
            "{ctx}: nothing is mounted at {}",
            path.display()
        );
    }
    for path in gone {
        assert_eq!(
            mount_count(&table, path),
            0,
            "{ctx}: {} is not mounted",
            path.display()
        );
        assert!(
            !path.exists(),
            "{ctx}: unpublish deleted {}",
            path.display()
        );
    }
}

/// ListVolumes, the metadata files and the images all hold exactly `want`.
async fn assert_listed(d: &TestDriver, api: &mut Api, want: &HashSet<String>, ctx: &str) {
    let listed = api.list().await;
    let set: HashSet<String> = listed.iter().cloned().collect();
    assert_eq!(
        listed.len(),
        set.len(),
        "{ctx}: ListVolumes repeats a volume"
    );
    assert_eq!(&set, want, "{ctx}: ListVolumes");
    let (mut metas, mut images) = (HashSet::new(), HashSet::new());
    for entry in std::fs::read_dir(d.state_dir().join("volumes")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".json") {
            metas.insert(stem.to_string());
        } else if let Some(stem) = name.strip_suffix(".img") {
            images.insert(stem.to_string());
        } else {
            panic!("{ctx}: unexpected file volumes/{name}");
        }
    }
    assert_eq!(&metas, want, "{ctx}: metadata files");
    assert_eq!(&images, want, "{ctx}: images");
}

fn dir_is_empty(path: &Path) -> bool {
    std::fs::read_dir(path).unwrap().next().is_none()
}

// ---- data ----

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `len` pseudo-random bytes determined by `seed`.
fn content(seed: &str, len: usize) -> Vec<u8> {
    loopcsi_testkit::pseudo_random(fnv(seed.as_bytes()), len)
}

/// Where a volume's payload lives: a file in a file system, or 1 MiB into a raw device.
const BLOCK_OFFSET: u64 = 1 << 20;

fn write_payload(kind: Kind, target: &Path, data: &[u8]) {
    match kind {
        Kind::Fs => {
            let mut f = std::fs::File::create(target.join("payload")).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        }
        Kind::Block => {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .unwrap();
            f.seek(SeekFrom::Start(BLOCK_OFFSET)).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        }
    }
}

fn read_payload(kind: Kind, target: &Path, len: usize) -> Vec<u8> {
    match kind {
        Kind::Fs => std::fs::read(target.join("payload")).unwrap(),
        Kind::Block => {
            let mut f = std::fs::File::open(target).unwrap();
            f.seek(SeekFrom::Start(BLOCK_OFFSET)).unwrap();
            let mut back = vec![0u8; len];
            f.read_exact(&mut back).unwrap();
            back
        }
    }
}

// ---- 1. races on one volume ----

/// NodeStageVolume against NodeUnstageVolume of the same volume and path, starting unstaged or
/// staged, for a file system and a block volume. Both calls are idempotent, so each is OK or
/// ABORTED; the kernel then shows the volume staged exactly once or not at all, as the order of
/// the successful calls implies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_stage_against_unstage() {
    let d = TestDriver::start().await;
    let mut api = Api::of(&d);
    let kinds = [Kind::Fs, Kind::Block];
    let mut ids = Vec::new();
    for kind in kinds {
        let req = create_req(&format!("pvc-su-{kind:?}"), 16 * MIB, kind.cap());
        ids.push(api.create(req).await.unwrap().volume_id);
    }
    let all: HashSet<String> = ids.iter().cloned().collect();
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let (kind, id) = (kinds[round % 2], ids[round % 2].as_str());
        let cap = kind.cap();
        let staging = d.staging(&format!("s{round}"));
        let ctx = format!("round {round} ({kind:?})");
        let was_staged = (round / 2) % 2 == 1;
        if was_staged {
            api.stage(id, &staging, &cap).await.unwrap();
        }
        let (mut a, mut b) = (api.clone(), api.clone());
        let (stage, unstage) = race(
            (round / 4) % 2 == 0,
            a.stage(id, &staging, &cap),
            b.unstage(id, &staging),
        )
        .await;
        tally.add(format!(
            "{} stage {}, unstage {}",
            if was_staged { "staged:" } else { "unstaged:" },
            code_of(&stage),
            code_of(&unstage)
        ));
        let staged_ok = took_effect("NodeStageVolume", &stage, &[]);
        let unstaged_ok = took_effect("NodeUnstageVolume", &unstage, &[]);
        assert!(
            staged_ok || unstaged_ok,
            "{ctx}: both calls ABORTED; one of them held the volume"
        );
        // Both OK: either order is possible, and the kernel must show one of them completely.
        let staged = match (staged_ok, unstaged_ok) {
            (true, true) => !devices_of(&d, id).is_empty(),
            (stage_won, _) => stage_won,
        };
        assert_kernel(
            &d,
            id,
            kind,
            Expect {
                staged_at: staged.then_some(staging.as_path()),
                ..Default::default()
            },
            &ctx,
        );
        settle!(api.unstage(id, &staging)).unwrap();
        assert_kernel(
            &d,
            id,
            kind,
            Expect {
                unmounted: &[&staging],
                ..Default::default()
            },
            &ctx,
        );
        assert_listed(&d, &mut api, &all, &ctx).await;
    }
    tally.print("race_stage_against_unstage");
    for id in &ids {
        api.delete(id).await.unwrap();
    }
    assert_listed(&d, &mut api, &HashSet::new(), "after delete").await;
    d.assert_clean();
}

/// NodePublishVolume against NodeUnpublishVolume of the same target, starting unpublished or
/// published: the target ends bound exactly once, or unmounted and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_publish_against_unpublish() {
    let d = TestDriver::start().await;
    let mut api = Api::of(&d);
    let kinds = [Kind::Fs, Kind::Block];
    let mut vols = Vec::new();
    for kind in kinds {
        let req = create_req(&format!("pvc-pu-{kind:?}"), 16 * MIB, kind.cap());
        let id = api.create(req).await.unwrap().volume_id;
        let staging = d.staging(&format!("{kind:?}"));
        api.stage(&id, &staging, &kind.cap()).await.unwrap();
        vols.push((id, staging));
    }
    let all: HashSet<String> = vols.iter().map(|(id, _)| id.clone()).collect();
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let kind = kinds[round % 2];
        let (id, staging) = (&vols[round % 2].0, &vols[round % 2].1);
        let cap = kind.cap();
        let target = d.target(&format!("pod{round}"));
        let ctx = format!("round {round} ({kind:?})");
        let was_published = (round / 2) % 2 == 1;
        if was_published {
            api.publish(id, staging, &target, &cap).await.unwrap();
        }
        let (mut a, mut b) = (api.clone(), api.clone());
        let (publish, unpublish) = race(
            (round / 4) % 2 == 0,
            a.publish(id, staging, &target, &cap),
            b.unpublish(id, &target),
        )
        .await;
        tally.add(format!(
            "{} publish {}, unpublish {}",
            if was_published {
                "published:"
            } else {
                "unpublished:"
            },
            code_of(&publish),
            code_of(&unpublish)
        ));
        let published_ok = took_effect("NodePublishVolume", &publish, &[]);
        let unpublished_ok = took_effect("NodeUnpublishVolume", &unpublish, &[]);
        assert!(
            published_ok || unpublished_ok,
            "{ctx}: both calls ABORTED; one of them held the volume"
        );
        let published = match (published_ok, unpublished_ok) {
            (true, true) => mounted(&target),
            (publish_won, _) => publish_won,
        };
        if published {
            assert_kernel(
                &d,
                id,
                kind,
                Expect {
                    staged_at: Some(staging),
                    published: &[&target],
                    ..Default::default()
                },
                &ctx,
            );
        } else {
            assert_kernel(
                &d,
                id,
                kind,
                Expect {
                    staged_at: Some(staging),
                    gone: &[&target],
                    ..Default::default()
                },
                &ctx,
            );
        }
        settle!(api.unpublish(id, &target)).unwrap();
        assert_kernel(
            &d,
            id,
            kind,
            Expect {
                staged_at: Some(staging),
                gone: &[&target],
                ..Default::default()
            },
            &ctx,
        );
        assert_listed(&d, &mut api, &all, &ctx).await;
    }
    tally.print("race_publish_against_unpublish");
    for (kind, (id, staging)) in kinds.iter().zip(&vols) {
        api.unstage(id, staging).await.unwrap();
        assert_kernel(
            &d,
            id,
            *kind,
            Expect {
                unmounted: &[staging],
                ..Default::default()
            },
            "end",
        );
        api.delete(id).await.unwrap();
    }
    assert_listed(&d, &mut api, &HashSet::new(), "after delete").await;
    d.assert_clean();
}

/// DeleteVolume against NodeStageVolume of a fresh volume: exactly one takes effect. Stage
/// first → delete is FAILED_PRECONDITION (in use) or ABORTED; delete first → stage is NOT_FOUND
/// or ABORTED. Never both OK: a deleted volume is never attached, a staged one never deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_delete_against_stage() {
    let d = TestDriver::start().await;
    let mut api = Api::of(&d);
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let kind = if round % 2 == 0 {
            Kind::Fs
        } else {
            Kind::Block
        };
        let cap = kind.cap();
        let ctx = format!("round {round} ({kind:?})");
        let req = create_req(&format!("pvc-ds-{round}"), 16 * MIB, cap.clone());
        let id = api.create(req).await.unwrap().volume_id;
        let staging = d.staging(&format!("s{round}"));
        let (mut a, mut b) = (api.clone(), api.clone());
        let (delete, stage) = race(
            (round / 2) % 2 == 0,
            a.delete(&id),
            b.stage(&id, &staging, &cap),
        )
        .await;
        tally.add(format!(
            "delete {}, stage {}",
            code_of(&delete),
            code_of(&stage)
        ));
        let deleted = took_effect("DeleteVolume", &delete, &[Code::FailedPrecondition]);
        let staged = took_effect("NodeStageVolume", &stage, &[Code::NotFound]);
        assert!(
            deleted != staged,
            "{ctx}: exactly one of DeleteVolume ({}) and NodeStageVolume ({}) takes effect",
            code_of(&delete),
            code_of(&stage)
        );
        if staged {
            assert_kernel(
                &d,
                &id,
                kind,
                Expect {
                    staged_at: Some(&staging),
                    ..Default::default()
                },
                &ctx,
            );
            assert_listed(&d, &mut api, &HashSet::from([id.clone()]), &ctx).await;
            assert_code(settle!(api.delete(&id)), Code::FailedPrecondition, "in use");
            settle!(api.unstage(&id, &staging)).unwrap();
            settle!(api.delete(&id)).unwrap();
        } else {
            assert!(
                !d.image_path(&id).exists(),
                "{ctx}: delete removed the image"
            );
        }
        assert_kernel(
            &d,
            &id,
            kind,
            Expect {
                unmounted: &[&staging],
                ..Default::default()
            },
            &ctx,
        );
        assert_listed(&d, &mut api, &HashSet::new(), &ctx).await;
        // The spec's answers for a volume that no longer exists.
        assert_code(api.stage(&id, &staging, &cap).await, Code::NotFound, "");
        assert_code(api.unstage(&id, &staging).await, Code::NotFound, "");
        api.delete(&id).await.unwrap();
        assert_kernel(
            &d,
            &id,
            kind,
            Expect {
                unmounted: &[&staging],
                ..Default::default()
            },
            &ctx,
        );
    }
    tally.print("race_delete_against_stage");
    d.assert_clean();
}

/// Two NodeStageVolume calls of one volume: at the same path both may succeed (idempotent),
/// and the volume ends attached once and mounted once; at two paths exactly one wins and the
/// other is ABORTED or FAILED_PRECONDITION (already staged elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_two_stages_of_one_volume() {
    let d = TestDriver::start().await;
    let mut api = Api::of(&d);
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let kind = if round % 2 == 0 {
            Kind::Fs
        } else {
            Kind::Block
        };
        let cap = kind.cap();
        // A fresh volume each round: the first stage of a file system volume formats it, so
        // the race is also one of two first stages (never two mkfs).
        let req = create_req(&format!("pvc-ss-{round}"), 16 * MIB, cap.clone());
        let id = api.create(req).await.unwrap().volume_id;
        let id = id.as_str();
        // Three of four pairs of rounds race at one path (the case a CO retry makes).
        let same_path = (round / 2) % 4 != 3;
        let ctx = format!(
            "round {round} ({kind:?}, {})",
            if same_path { "same path" } else { "two paths" }
        );
        let first = d.staging(&format!("a{round}"));
        let second = if same_path {
            first.clone()
        } else {
            d.staging(&format!("b{round}"))
        };
        let (mut a, mut b) = (api.clone(), api.clone());
        let (r1, r2) = race(
            (round / 8) % 2 == 0,
            a.stage(id, &first, &cap),
            b.stage(id, &second, &cap),
        )
        .await;
        tally.add(format!(
            "{}: {} / {}",
            if same_path { "same path" } else { "two paths" },
            code_of(&r1),
            code_of(&r2)
        ));
        let allowed: &[Code] = if same_path {
            &[]
        } else {
            &[Code::FailedPrecondition]
        };
        let ok1 = took_effect("first NodeStageVolume", &r1, allowed);
        let ok2 = took_effect("second NodeStageVolume", &r2, allowed);
        assert!(ok1 || ok2, "{ctx}: no stage took effect");
        if !same_path {
            assert!(
                !(ok1 && ok2),
                "{ctx}: one volume was staged at two paths at once"
            );
        }
        let (winner, loser) = if ok1 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        let others: Vec<&Path> = if same_path { vec![] } else { vec![loser] };
        assert_kernel(
            &d,
            id,
            kind,
            Expect {
                staged_at: Some(winner),
                unmounted: &others,
                ..Default::default()
            },
            &ctx,
        );
        if !same_path {
            // Unstaging where the volume is not staged is OK and leaves the real staging alone.
            api.unstage(id, loser).await.unwrap();
            assert_kernel(
                &d,
                id,
                kind,
                Expect {
                    staged_at: Some(winner),
                    unmounted: &others,
                    ..Default::default()
                },
                &ctx,
            );
        }
        if kind == Kind::Fs {
            // The file system that won is the volume's for good: it survives a re-stage.
            std::fs::write(winner.join("marker"), id).unwrap();
            settle!(api.unstage(id, winner)).unwrap();
            settle!(api.stage(id, winner, &cap)).unwrap();
            assert_eq!(
                std::fs::read_to_string(winner.join("marker")).unwrap(),
                id,
                "{ctx}: the volume was formatted once"
            );
        }
        settle!(api.unstage(id, winner)).unwrap();
        assert_kernel(
            &d,
            id,
            kind,
            Expect {
                unmounted: &[&first, &second],
                ..Default::default()
            },
            &ctx,
        );
        assert_listed(&d, &mut api, &HashSet::from([id.to_string()]), &ctx).await;
        api.delete(id).await.unwrap();
        assert_listed(&d, &mut api, &HashSet::new(), &ctx).await;
    }
    tally.print("race_two_stages_of_one_volume");
    d.assert_clean();
}

/// CreateVolume with one name from 16 tasks at once, repeated with fresh names and kinds:
/// each name makes exactly one volume (one image, one metadata file), every OK answer carries
/// its id, the others are ABORTED, and ListVolumes shows exactly the volumes made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_create_with_one_name_from_16_tasks() {
    let d = TestDriver::start().await;
    let mut api = Api::of(&d);
    let mut made = HashSet::new();
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let kind = if round % 2 == 0 {
            Kind::Block
        } else {
            Kind::Fs
        };
        let provisioning = if (round / 2) % 2 == 0 {
            "thin"
        } else {
            "thick"
        };
        let name = format!("pvc-create-{round}");
        let req = with_params(
            create_req(&name, 16 * MIB, kind.cap()),
            &[("provisioning", provisioning)],
        );
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (mut api, req) = (api.clone(), req.clone());
                tokio::spawn(async move { api.create(req).await })
            })
            .collect();
        let mut ids = HashSet::new();
        let mut oks = 0;
        for task in tasks {
            let result = task.await.unwrap();
            if took_effect("CreateVolume", &result, &[]) {
                let vol = result.unwrap();
                assert_eq!(vol.capacity_bytes, 16 * MIB);
                ids.insert(vol.volume_id);
                oks += 1;
            }
        }
        tally.add(format!("{oks:2} of 16 OK"));
        assert!(oks > 0, "round {round}: every CreateVolume was ABORTED");
        let retry = settle!(api.create(req.clone())).unwrap();
        ids.insert(retry.volume_id.clone());
        assert_eq!(ids.len(), 1, "round {round}: one name made several volumes");
        made.insert(retry.volume_id);
        assert_listed(&d, &mut api, &made, &format!("round {round}")).await;
    }
    tally.print("race_create_with_one_name_from_16_tasks");
    for id in &made {
        api.delete(id).await.unwrap();
    }
    assert_listed(&d, &mut api, &HashSet::new(), "after delete").await;
    d.assert_clean();
}

// ---- 2. many volumes at once ----

struct Placed {
    id: String,
    staging: PathBuf,
    target: PathBuf,
    data: Vec<u8>,
}

/// `count` volumes created, staged, published and written all at once, then checked, then
/// torn down all at once.
async fn many_volumes_at_once(kind: Kind, count: usize) {
    let d = TestDriver::start().await;
    let mut api = Api::of(&d);
    let cap = kind.cap();
    let len = 256 << 10;
    let mut tasks = Vec::new();
    for i in 0..count {
        let (staging, target) = (d.staging(&format!("s{i}")), d.target(&format!("pod{i}")));
        let (mut api, cap) = (api.clone(), cap.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("pvc-many-{i}");
            let id = api
                .create(create_req(&name, 16 * MIB, cap.clone()))
                .await
                .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}"))
                .volume_id;
            api.stage(&id, &staging, &cap)
                .await
                .unwrap_or_else(|s| panic!("NodeStageVolume {name}: {s:?}"));
            api.publish(&id, &staging, &target, &cap)
                .await
                .unwrap_or_else(|s| panic!("NodePublishVolume {name}: {s:?}"));
            let data = content(&id, len);
            let (t, bytes) = (target.clone(), data.clone());
            tokio::task::spawn_blocking(move || write_payload(kind, &t, &bytes))
                .await
                .unwrap();
            Placed {
                id,
                staging,
                target,
                data,
            }
        }));
    }
    let mut vols = Vec::new();
    for task in tasks {
        vols.push(task.await.unwrap());
    }

    let ids: HashSet<String> = vols.iter().map(|v| v.id.clone()).collect();
    assert_eq!(ids.len(), count, "every volume has its own id");
    let mut devices = HashSet::new();
    for (i, v) in vols.iter().enumerate() {
        let ctx = format!("volume {i} ({kind:?})");
        assert_kernel(
            &d,
            &v.id,
            kind,
            Expect {
                staged_at: Some(&v.staging),
                published: &[&v.target],
                ..Default::default()
            },
            &ctx,
        );
        devices.insert(devices_of(&d, &v.id)[0]);
    }
    assert_eq!(devices.len(), count, "{count} distinct loop devices");
    for (i, v) in vols.iter().enumerate() {
        let back = read_payload(kind, &v.target, len);
        assert!(
            back == v.data,
            "volume {i} does not hold its own data (crossed or lost writes)"
        );
    }
    assert_listed(&d, &mut api, &ids, "all made").await;

    let tasks: Vec<_> = vols
        .into_iter()
        .map(|v| {
            let mut api = api.clone();
            tokio::spawn(async move {
                api.unpublish(&v.id, &v.target)
                    .await
                    .unwrap_or_else(|s| panic!("NodeUnpublishVolume {}: {s:?}", v.id));
                api.unstage(&v.id, &v.staging)
                    .await
                    .unwrap_or_else(|s| panic!("NodeUnstageVolume {}: {s:?}", v.id));
                api.delete(&v.id)
                    .await
                    .unwrap_or_else(|s| panic!("DeleteVolume {}: {s:?}", v.id));
                v.target
            })
        })
        .collect();
    for task in tasks {
        let target = task.await.unwrap();
        assert!(!target.exists(), "unpublish deleted {}", target.display());
    }
    d.assert_clean();
    assert_listed(&d, &mut api, &HashSet::new(), "all deleted").await;
    assert!(
        dir_is_empty(&d.state_dir().join("volumes")),
        "volumes/ is empty"
    );
    assert!(dir_is_empty(&d.state_dir().join("node")), "node/ is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_ext4_volumes_at_once() {
    many_volumes_at_once(Kind::Fs, 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_block_volumes_at_once() {
    many_volumes_at_once(Kind::Block, 16).await;
}

// ---- 3. a full pool ----

fn statvfs(path: &Path) -> nix::sys::statvfs::Statvfs {
    nix::sys::statvfs::statvfs(path).unwrap()
}

/// Free bytes for unprivileged users (what GetCapacity reports), rounded down to whole MiB.
fn available_mib_floor(path: &Path) -> i64 {
    let st = statvfs(path);
    let bytes = i64::try_from(st.blocks_available() * st.fragment_size()).unwrap();
    bytes - bytes % MIB
}

/// Free bytes including the root reserve.
fn free_bytes(path: &Path) -> i64 {
    let st = statvfs(path);
    i64::try_from(st.blocks_free() * st.fragment_size()).unwrap()
}

/// GetCapacity (for `caps`), checked against statvfs of the pool taken just before and just
/// after the call: it reports the pool's free space, no more and no less.
async fn capacity(api: &mut Api, state: &Path, caps: Vec<csi::VolumeCapability>) -> i64 {
    let minimum = if caps.is_empty() { MIB } else { 16 * MIB };
    let before = available_mib_floor(state);
    let reply = api.capacity(caps).await;
    let after = available_mib_floor(state);
    let truthful = |free: i64| if free < minimum { 0 } else { free };
    let (low, high) = (truthful(before.min(after)), truthful(before.max(after)));
    assert!(
        (low..=high).contains(&reply.available_capacity),
        "GetCapacity says {} bytes; statvfs of the pool says {before}..{after}",
        reply.available_capacity
    );
    assert_eq!(
        reply.maximum_volume_size,
        Some(reply.available_capacity),
        "maximum_volume_size is what CreateVolume accepts"
    );
    reply.available_capacity
}

fn thick(req: csi::CreateVolumeRequest) -> csi::CreateVolumeRequest {
    with_params(req, &[("provisioning", "thick")])
}

fn thin(req: csi::CreateVolumeRequest) -> csi::CreateVolumeRequest {
    with_params(req, &[("provisioning", "thin")])
}

/// Writes 1 MiB chunks to `path`, each followed by fdatasync, until a write or a sync fails or
/// `limit` bytes are written. Returns the bytes written and the error.
fn write_until_error(path: &Path, limit: usize) -> (usize, Option<std::io::Error>) {
    let mut f = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let chunk = content("thin filler", 1 << 20);
    let mut written = 0;
    while written < limit {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            return (written, Some(e));
        }
        written += chunk.len();
    }
    (written, None)
}

/// One volume of the full-pool scenario, staged and published.
struct Mounted {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

/// A 256 MiB pool brought to 100 % full, the way thin overcommit does it.
struct FullPool {
    d: TestDriver,
    api: Api,
    state: PathBuf,
    /// GetCapacity of the empty pool.
    initial: i64,
    /// The overcommitted thin volume, written until the pool's ENOSPC surfaced inside it.
    thin: Mounted,
    /// A thick volume holding `precious.bin` and `later.bin`.
    keeper: Mounted,
    precious_sum: u64,
    later: Vec<u8>,
    /// Thick volumes that filled the pool, with their sizes.
    fillers: Vec<(String, i64)>,
}

/// Builds the full pool, checking on the way:
/// - GetCapacity is the pool's free space (statvfs), > 0 and ≤ the pool's size;
/// - CreateVolume past it is RESOURCE_EXHAUSTED (thick or thin) and leaves nothing behind;
/// - thick volumes fill the pool, GetCapacity drops with each, and CreateVolume answers
///   RESOURCE_EXHAUSTED (never INTERNAL) once it is full; GetCapacity's last figure is
///   exactly what CreateVolume accepts;
/// - a 200 MiB thin volume written past the pool's free space fails inside (EIO/ENOSPC from a
///   write or fsync), and a thick volume's checksummed data survives, and it stays writable.
async fn fill_pool_and_overflow_thin_volume() -> FullPool {
    let d = TestDriver::start_on_small_pool("ext4", 256).await;
    let mut api = Api::of(&d);
    let state = d.state_dir();
    let pool_bytes = 256 * MIB;
    let fs_cap = Kind::Fs.cap();
    let blk_cap = Kind::Block.cap();

    let initial = capacity(&mut api, &state, vec![]).await;
    assert!(
        initial > 0 && initial <= pool_bytes,
        "GetCapacity {initial} of a {pool_bytes}-byte pool"
    );
    let initial_fs = capacity(&mut api, &state, vec![fs_cap.clone()]).await;
    assert!(initial_fs > 0 && initial_fs <= initial);

    // Bigger than the pool's free space: RESOURCE_EXHAUSTED, thick or thin, nothing left.
    for req in [
        thick(create_req("too-big-thick", initial + MIB, fs_cap.clone())),
        thin(create_req("too-big-thin", initial + MIB, fs_cap.clone())),
    ] {
        assert_code(api.create(req).await, Code::ResourceExhausted, "");
    }
    assert_listed(&d, &mut api, &HashSet::new(), "after refused creates").await;

    // A thin volume that will be overcommitted, and a thick one with precious data.
    let thin_size = 200 * MIB;
    assert!(
        thin_size <= initial,
        "the pool has room for the thin volume now"
    );
    let thin_id = api
        .create(thin(create_req("thin", thin_size, fs_cap.clone())))
        .await
        .unwrap()
        .volume_id;
    let keeper_id = api
        .create(thick(create_req("keeper", 32 * MIB, fs_cap.clone())))
        .await
        .unwrap()
        .volume_id;
    let thin_vol = Mounted {
        id: thin_id,
        staging: d.staging("thin"),
        target: d.target("thin"),
    };
    let keeper = Mounted {
        id: keeper_id,
        staging: d.staging("keeper"),
        target: d.target("keeper"),
    };
    for v in [&thin_vol, &keeper] {
        api.stage(&v.id, &v.staging, &fs_cap).await.unwrap();
        api.publish(&v.id, &v.staging, &v.target, &fs_cap)
            .await
            .unwrap();
    }
    let precious = content("precious", 8 << 20);
    let precious_sum = fnv(&precious);
    {
        let mut f = std::fs::File::create(keeper.target.join("precious.bin")).unwrap();
        f.write_all(&precious).unwrap();
        f.sync_all().unwrap();
    }

    // Fill the pool with thick volumes until CreateVolume says RESOURCE_EXHAUSTED.
    let mut last = capacity(&mut api, &state, vec![]).await;
    let mut fillers: Vec<(String, i64)> = Vec::new();
    loop {
        assert!(
            fillers.len() < 32,
            "a 256 MiB pool holds fewer 16 MiB volumes"
        );
        let name = format!("filler-{}", fillers.len());
        match api
            .create(thick(create_req(&name, 16 * MIB, blk_cap.clone())))
            .await
        {
            Ok(vol) => {
                assert_eq!(vol.capacity_bytes, 16 * MIB);
                fillers.push((vol.volume_id, vol.capacity_bytes));
                let now = capacity(&mut api, &state, vec![]).await;
                assert!(
                    now <= last - 16 * MIB,
                    "GetCapacity went from {last} to {now} after a 16 MiB thick volume"
                );
                last = now;
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "a full pool is RESOURCE_EXHAUSTED: {status:?}"
                );
                assert!(
                    last < 16 * MIB,
                    "CreateVolume refused 16 MiB while GetCapacity offered {last}: {status:?}"
                );
                break;
            }
        }
    }
    // GetCapacity's figure is exactly what CreateVolume accepts: take the rest.
    if last > 0 {
        let vol = api
            .create(thick(create_req("filler-rest", last, blk_cap.clone())))
            .await
            .unwrap_or_else(|s| {
                panic!("GetCapacity offered {last} bytes, CreateVolume of that size: {s:?}")
            });
        fillers.push((vol.volume_id, vol.capacity_bytes));
    }
    assert_eq!(
        capacity(&mut api, &state, vec![]).await,
        0,
        "the pool is full"
    );
    assert_eq!(capacity(&mut api, &state, vec![fs_cap.clone()]).await, 0);
    for req in [
        thick(create_req("one-more-thick", MIB, blk_cap.clone())),
        thin(create_req("one-more-thin", MIB, blk_cap.clone())),
    ] {
        assert_code(api.create(req).await, Code::ResourceExhausted, "");
    }
    let mut all: HashSet<String> = fillers.iter().map(|(id, _)| id.clone()).collect();
    all.extend([thin_vol.id.clone(), keeper.id.clone()]);
    assert_listed(&d, &mut api, &all, "pool full").await;

    // Write the overcommitted thin volume until the pool's ENOSPC surfaces inside it.
    let fill_path = thin_vol.target.join("fill.bin");
    let limit = usize::try_from(thin_size).unwrap();
    let (written, error) =
        tokio::task::spawn_blocking(move || write_until_error(&fill_path, limit))
            .await
            .unwrap();
    let error = error.unwrap_or_else(|| {
        panic!("{written} bytes went into a thin volume on a full pool without an error")
    });
    eprintln!("thin volume: {written} bytes written, then: {error}");
    assert!(
        matches!(
            error.raw_os_error(),
            Some(nix::libc::EIO | nix::libc::ENOSPC | nix::libc::EROFS)
        ),
        "the pool's ENOSPC shows as EIO or ENOSPC inside the volume: {error}"
    );
    assert!(
        written < limit - (32 << 20),
        "the error came from the full pool, not from the thin volume's own file system \
         ({written} bytes written)"
    );
    assert_eq!(capacity(&mut api, &state, vec![]).await, 0);

    // The thick volume is intact, and still writable: its blocks were allocated up front.
    let back = std::fs::read(keeper.target.join("precious.bin")).unwrap();
    assert_eq!(
        fnv(&back),
        precious_sum,
        "the thick volume's data is intact"
    );
    let later = content("written after the storm", 4 << 20);
    {
        let mut f = std::fs::File::create(keeper.target.join("later.bin")).unwrap();
        f.write_all(&later)
            .and_then(|()| f.sync_all())
            .expect("a thick volume never runs out of space, even on a full pool");
    }
    FullPool {
        d,
        api,
        state,
        initial,
        thin: thin_vol,
        keeper,
        precious_sum,
        later,
        fillers,
    }
}

/// Unpublishes and unstages both volumes, and checks the kernel lets go of it.
async fn tear_down(p: &mut FullPool, which: &str) {
    for v in [&p.thin, &p.keeper] {
        settle!(p.api.unpublish(&v.id, &v.target))
            .unwrap_or_else(|s| panic!("{which}: NodeUnpublishVolume: {s:?}"));
        settle!(p.api.unstage(&v.id, &v.staging))
            .unwrap_or_else(|s| panic!("{which}: NodeUnstageVolume: {s:?}"));
        assert_kernel(
            &p.d,
            &v.id,
            Kind::Fs,
            Expect {
                unmounted: &[&v.staging],
                gone: &[&v.target],
                ..Default::default()
            },
            which,
        );
    }
}

/// Deletes the fillers and checks their space comes back (statvfs and GetCapacity).
async fn delete_fillers(p: &mut FullPool) {
    let low = capacity(&mut p.api, &p.state, vec![]).await;
    let free_before = free_bytes(&p.state);
    let filled: i64 = p.fillers.iter().map(|(_, size)| size).sum();
    for (id, _) in std::mem::take(&mut p.fillers) {
        settle!(p.api.delete(&id)).unwrap();
    }
    let freed = free_bytes(&p.state) - free_before;
    assert!(
        freed >= filled,
        "deleting {filled} bytes of thick volumes freed only {freed}"
    );
    let up = capacity(&mut p.api, &p.state, vec![]).await;
    assert!(
        up > low,
        "GetCapacity goes back up after deletes ({low} → {up})"
    );
}

/// Deletes the two volumes and checks the pool is as empty as at the start.
async fn delete_all(mut p: FullPool) {
    for id in [p.thin.id.clone(), p.keeper.id.clone()] {
        settle!(p.api.delete(&id)).unwrap();
    }
    let end = capacity(&mut p.api, &p.state, vec![]).await;
    assert!(
        end + MIB >= p.initial,
        "an empty pool has its space back: {end} now, {} at start",
        p.initial
    );
    assert_listed(&p.d, &mut p.api, &HashSet::new(), "all deleted").await;
    assert!(dir_is_empty(&p.state.join("node")), "node/ is empty");
    assert_clean_on_small_pool(&p.d);
}

/// `assert_clean` for a driver on a small pool: the pool's own loop device and its mount at
/// the state dir belong to the fixture, everything else must be gone.
fn assert_clean_on_small_pool(d: &TestDriver) {
    let pool_mount = format!("mount {}", d.state_dir().display());
    let pool_image = format!("-> {}", d.root().join("pool.img").display());
    let left: Vec<String> = leftovers_under(d.root())
        .into_iter()
        .filter(|l| *l != pool_mount && !l.ends_with(&pool_image))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "the driver left these behind");
}

/// A 256 MiB pool filled by thick volumes and overflowed by a thin one (see
/// `fill_pool_and_overflow_thin_volume`); once deletes give space back, the thin volume's file
/// system still mounts, and the thick volume's data is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_is_resource_exhausted_and_thin_overflow_spares_other_volumes() {
    let mut p = fill_pool_and_overflow_thin_volume().await;
    delete_fillers(&mut p).await;
    tear_down(&mut p, "after deletes").await;
    let fs_cap = Kind::Fs.cap();
    for v in [&p.thin, &p.keeper] {
        settle!(p.api.stage(&v.id, &v.staging, &fs_cap))
            .unwrap_or_else(|s| panic!("re-stage after the pool's ENOSPC: {s:?}"));
        settle!(p.api.publish(&v.id, &v.staging, &v.target, &fs_cap)).unwrap();
        assert_kernel(
            &p.d,
            &v.id,
            Kind::Fs,
            Expect {
                staged_at: Some(&v.staging),
                published: &[&v.target],
                ..Default::default()
            },
            "re-staged",
        );
        let table = mount::mounts().unwrap();
        let entry = table.iter().find(|m| m.mount_point == v.staging).unwrap();
        assert_eq!(entry.fs_type, "ext4");
        std::fs::read_dir(&v.target)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .expect("the re-mounted file system can be listed");
    }
    let back = std::fs::read(p.keeper.target.join("precious.bin")).unwrap();
    assert_eq!(
        fnv(&back),
        p.precious_sum,
        "the thick volume's data is intact on disk"
    );
    assert!(
        std::fs::read(p.keeper.target.join("later.bin")).unwrap() == p.later,
        "what the thick volume took on a full pool is on disk"
    );
    tear_down(&mut p, "after re-stage").await;
    delete_all(p).await;
}

/// NodeUnpublishVolume and NodeUnstageVolume work on a pool that is 100 % full (a thin volume
/// took the last block): the CO must be able to stop pods to free space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_works_on_a_full_pool() {
    let mut p = fill_pool_and_overflow_thin_volume().await;
    let st = statvfs(&p.state);
    eprintln!(
        "pool after the overflow: {} blocks free, {} available",
        st.blocks_free(),
        st.blocks_available()
    );
    tear_down(&mut p, "on a full pool").await;
    delete_fillers(&mut p).await;
    delete_all(p).await;
}
