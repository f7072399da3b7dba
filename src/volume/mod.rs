//! The volume domain: ids, typed parameters, the pool of backing files and their metadata,
//! node staging and publishing, and per-volume operation guards. No gRPC types here.

pub mod content;
pub mod copath;
pub mod data;
pub mod freeze;
pub mod group;
pub mod groups;
pub(crate) mod handle;
pub mod id;
pub mod inuse;
pub mod layout;
pub mod locks;
pub mod meta;
pub mod metadata;
pub mod node;
pub(crate) mod observed;
pub(crate) mod orphans;
pub mod params;
pub mod pool;
pub mod reconcile;
pub(crate) mod records;
pub(crate) mod recovery;
pub mod rescue;
pub mod stack;
pub(crate) mod stage;
pub mod statedir;
pub mod status;
pub(crate) mod targets;
pub mod volumes;

pub use volumes::Volumes;

#[cfg(test)]
mod tests;
