//! The SnapshotMetadata (changed-block tracking) client: collects a server stream into one
//! answer, so tests and the bench can compare ranges and assert codes.

use std::path::Path;

use loopcsi::csi;
use loopcsi::csi::snapshot_metadata_client::SnapshotMetadataClient;
use tonic::transport::Channel;
use tonic::Status;

/// A whole streamed answer: the type and capacity every message carried, the ranges of all
/// messages in order as `(offset, length)`, and how many messages there were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges {
    pub block_metadata_type: i32,
    pub capacity: i64,
    pub ranges: Vec<(i64, i64)>,
    pub messages: usize,
}

impl Ranges {
    fn add(&mut self, kind: i32, capacity: i64, ranges: &[csi::BlockMetadata]) {
        if self.messages > 0 {
            assert_eq!((kind, capacity), (self.block_metadata_type, self.capacity));
        }
        self.block_metadata_type = kind;
        self.capacity = capacity;
        self.messages += 1;
        self.ranges
            .extend(ranges.iter().map(|b| (b.byte_offset, b.size_bytes)));
    }
}

/// The SnapshotMetadata client on its own connection to a driver's socket.
#[derive(Clone)]
pub struct MetadataClient(pub SnapshotMetadataClient<Channel>);

impl MetadataClient {
    pub async fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        let channel = crate::client::try_connect(socket.to_path_buf()).await?;
        Ok(MetadataClient(SnapshotMetadataClient::new(channel)))
    }

    /// GetMetadataAllocated, the whole stream.
    pub async fn allocated(&self, snapshot: &str, from: i64, max: i32) -> Result<Ranges, Status> {
        let stream = self
            .0
            .clone()
            .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
                snapshot_id: snapshot.into(),
                starting_offset: from,
                max_results: max,
                secrets: Default::default(),
            })
            .await?
            .into_inner();
        gather(stream).await
    }

    /// GetMetadataDelta, the whole stream.
    pub async fn delta(
        &self,
        base: &str,
        target: &str,
        from: i64,
        max: i32,
    ) -> Result<Ranges, Status> {
        let stream = self
            .0
            .clone()
            .get_metadata_delta(csi::GetMetadataDeltaRequest {
                base_snapshot_id: base.into(),
                target_snapshot_id: target.into(),
                starting_offset: from,
                max_results: max,
                secrets: Default::default(),
            })
            .await?
            .into_inner();
        gather(stream).await
    }
}

/// One streamed message of either RPC: its block metadata type, the volume's size, its ranges.
trait Page {
    fn parts(&self) -> (i32, i64, &[csi::BlockMetadata]);
}

impl Page for csi::GetMetadataAllocatedResponse {
    fn parts(&self) -> (i32, i64, &[csi::BlockMetadata]) {
        (
            self.block_metadata_type,
            self.volume_capacity_bytes,
            &self.block_metadata,
        )
    }
}

impl Page for csi::GetMetadataDeltaResponse {
    fn parts(&self) -> (i32, i64, &[csi::BlockMetadata]) {
        (
            self.block_metadata_type,
            self.volume_capacity_bytes,
            &self.block_metadata,
        )
    }
}

/// The whole stream, gathered.
async fn gather<M: Page>(mut stream: tonic::Streaming<M>) -> Result<Ranges, Status> {
    let mut all = Ranges::default();
    while let Some(m) = stream.message().await? {
        let (kind, capacity, ranges) = m.parts();
        all.add(kind, capacity, ranges);
    }
    Ok(all)
}
