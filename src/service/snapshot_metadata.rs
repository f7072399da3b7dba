//! CSI SnapshotMetadata service (changed-block tracking, alpha in CSI v1.10+): the allocated
//! ranges of a snapshot and the changed ranges between two snapshots of one volume, each a
//! server stream of pages. The work is in `volume::metadata`; this file parses, calls the door
//! once, and cuts the answer into messages of at most `max_results` ranges.
//!
//! Secrets (`secrets`, marked `csi_secret`) are never read nor logged: the spans carry only ids.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::csi::{self, snapshot_metadata_server::SnapshotMetadata};
use crate::error::{Error, Result};
use crate::rpc_span;
use crate::service::{snapshot_id, Driver};
use crate::volume::metadata::{Shape, Walk};

/// Ranges per message when the caller leaves `max_results` at 0: about 80 KiB a message.
pub const DEFAULT_PAGE: usize = 4096;

type Pages<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct SnapshotMetadataService {
    driver: Arc<Driver>,
}

impl SnapshotMetadataService {
    pub fn new(driver: Arc<Driver>) -> Self {
        SnapshotMetadataService { driver }
    }
}

/// `starting_offset`: a byte offset, never negative.
fn offset(value: i64) -> Result<u64> {
    u64::try_from(value)
        .map_err(|_| Error::invalid("starting_offset", format!("{value} is negative")))
}

/// `max_results`: ranges per message; 0 lets the plugin decide, negative is invalid.
fn page_size(value: i32) -> Result<usize> {
    match usize::try_from(value) {
        Ok(0) => Ok(DEFAULT_PAGE),
        Ok(n) => Ok(n),
        Err(_) => Err(Error::invalid(
            "max_results",
            format!("{value} is negative"),
        )),
    }
}

fn metadata_type(shape: Shape) -> csi::BlockMetadataType {
    match shape {
        Shape::Variable => csi::BlockMetadataType::VariableLength,
        Shape::Fixed(_) => csi::BlockMetadataType::FixedLength,
    }
}

/// The most ranges one message carries, whatever `max_results` asks: about 1.5 MiB encoded,
/// under gRPC's default 4 MiB message limit, and a bound on what one message holds in memory
/// (the spec lets the plugin send fewer than `max_results`).
pub const MAX_PAGE: usize = 65_536;

/// Messages computed ahead of the client: the walk pauses when they are not taken.
const AHEAD: usize = 2;

/// The answer as a stream of messages of at most `page` ranges each, computed as it is sent:
/// a blocking task walks the snapshot files a step at a time (`Walk`) and hands messages over
/// a channel of `AHEAD`, so memory stays one step and a few messages however large the answer.
/// An empty answer is one message with no ranges, so the caller still learns the type and the
/// capacity. The walk, and with it the snapshots' guards, ends when the stream is done or its
/// client goes away.
fn pages<T: Send + 'static>(
    walk: Walk,
    page: usize,
    make: fn(i32, i64, Vec<csi::BlockMetadata>) -> T,
    span: tracing::Span,
) -> Pages<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(AHEAD);
    tokio::task::spawn_blocking(move || span.in_scope(|| produce(walk, page, make, &tx)));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

type Sender<T> = tokio::sync::mpsc::Sender<std::result::Result<T, Status>>;

fn produce<T>(
    mut walk: Walk,
    page: usize,
    make: fn(i32, i64, Vec<csi::BlockMetadata>) -> T,
    tx: &Sender<T>,
) {
    let page = page.clamp(1, MAX_PAGE);
    let kind = metadata_type(walk.shape) as i32;
    let capacity = i64::try_from(walk.capacity).unwrap_or(i64::MAX);
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut message = Vec::with_capacity(page.min(DEFAULT_PAGE));
    let mut sent = 0usize;
    loop {
        let step = match walk.next_ranges() {
            Ok(Some(step)) => step,
            Ok(None) => break,
            Err(err) => {
                tracing::warn!(error = %err, messages = sent, "changed-block answer failed while streaming");
                let _ = tx.blocking_send(Err(Status::from(err)));
                return;
            }
        };
        for (offset, length) in step {
            message.push(csi::BlockMetadata {
                byte_offset: as_i64(offset),
                size_bytes: as_i64(length),
            });
            if message.len() == page {
                let full =
                    std::mem::replace(&mut message, Vec::with_capacity(page.min(DEFAULT_PAGE)));
                if tx.blocking_send(Ok(make(kind, capacity, full))).is_err() {
                    return; // the client went away
                }
                sent += 1;
            }
        }
    }
    if !message.is_empty() || sent == 0 {
        let _ = tx.blocking_send(Ok(make(kind, capacity, message)));
    }
    tracing::debug!(method = ?walk.method, "changed-block answer streamed");
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = Pages<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Pages<csi::GetMetadataDeltaResponse>;

    /// GetMetadataAllocated: INVALID_ARGUMENT for a missing id or a negative offset or
    /// max_results, NOT_FOUND for an unknown snapshot, OUT_OF_RANGE for an offset at or past
    /// the volume's end; ABORTED while the snapshot is being deleted. Reads of one snapshot (more
    /// GetMetadata calls, restores) share it and run at the same time. The snapshot is held
    /// while the answer streams, which is computed as it is sent (`pages`).
    async fn get_metadata_allocated(
        &self,
        request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> std::result::Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = request.into_inner();
        let rpc = rpc_span!("GetMetadataAllocated", &req.snapshot_id);
        // The answer is computed while it streams: its log lines belong to the RPC's span.
        let span = rpc.span.clone();
        let shape = self.driver.cbt_shape;
        let answer = self
            .driver
            .run(rpc, move |domain| {
                let id = snapshot_id("snapshot_id", &req.snapshot_id)?;
                let from = offset(req.starting_offset)?;
                let page = page_size(req.max_results)?;
                Ok((domain.metadata_allocated(&id, from, shape)?, page))
            })
            .await?;
        let (list, page) = answer.into_inner();
        Ok(Response::new(pages(
            list,
            page,
            |kind, capacity, ranges| csi::GetMetadataAllocatedResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: capacity,
                block_metadata: ranges,
            },
            span,
        )))
    }

    /// GetMetadataDelta: as GetMetadataAllocated, and INVALID_ARGUMENT for snapshots of
    /// different volumes or a base taken after the target.
    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> std::result::Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = request.into_inner();
        let rpc = rpc_span!("GetMetadataDelta", &req.target_snapshot_id);
        let span = rpc.span.clone();
        let shape = self.driver.cbt_shape;
        let answer = self
            .driver
            .run(rpc, move |domain| {
                let base = snapshot_id("base_snapshot_id", &req.base_snapshot_id)?;
                let target = snapshot_id("target_snapshot_id", &req.target_snapshot_id)?;
                let from = offset(req.starting_offset)?;
                let page = page_size(req.max_results)?;
                Ok((domain.metadata_delta(&base, &target, from, shape)?, page))
            })
            .await?;
        let (list, page) = answer.into_inner();
        Ok(Response::new(pages(
            list,
            page,
            |kind, capacity, ranges| csi::GetMetadataDeltaResponse {
                block_metadata_type: kind,
                volume_capacity_bytes: capacity,
                block_metadata: ranges,
            },
            span,
        )))
    }
}
