//! The only door to the operating system. Nothing here knows about CSI.

pub mod files;
pub mod loopdev;
pub mod mount;
pub mod tools;
