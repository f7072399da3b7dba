//! loopcsi: a CSI driver that gives pods fast, local, crash-safe volumes, each a sparse file in a
//! pool directory attached as a loop device.
//!
//! Layers (a request flows down once and back up once):
//! - [`service`]: the CSI gRPC services; parse and validate, call the domain, build the reply;
//! - [`volume`]: the domain: volume ids, typed parameters, the pool of backing files with their
//!   metadata, node staging and publishing, per-volume operation guards;
//! - [`host`]: the only door to the operating system (loop ioctls, mounts, mkfs/blkid, files).
//!
//! Beside them, [`router`] (`loopcsi route-snapshots`) is an outer layer like [`service`]: a
//! Kubernetes controller that asks the driver over its CSI socket, never the domain.

pub mod authority;
pub mod codec;
pub mod config;
pub mod error;
pub mod faults;
pub mod host;
pub mod metrics;
pub mod operator;
pub mod router;
pub mod server;
pub mod service;
pub mod volume;

/// The CSI v1.12 protocol, generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}
