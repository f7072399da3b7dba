//! `Tools` with stand-ins for the real tools (scripts in a temp dir): a tool past its deadline
//! is killed with everything it started and reported as `ToolTimedOut`; a tool within it is
//! run as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use loopcsi::error::Error;
use loopcsi::host::tools::{FsType, Probe, Tools};

fn stand_in(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// One test: every script is written before any is run, so no fork of a parallel test can
/// hold one open for writing while it is executed (ETXTBSY).
#[test]
fn tools_past_their_deadline_are_killed_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("held");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // The hung tool starts a process of its own that holds the fifo open: once every writer
    // is gone the reader below sees end-of-file, which proves the whole group was killed.
    let hung = stand_in(
        dir.path(),
        "mkfs.hung",
        &format!("sleep 600 >'{}' &\nwait", fifo.display()),
    );
    let blkid = stand_in(dir.path(), "blkid", "echo TYPE=ext4");
    let failing = stand_in(dir.path(), "resize2fs", "echo 'no room' >&2; exit 3");

    let (closed, all_closed) = mpsc::channel();
    let reader_fifo = fifo.clone();
    std::thread::spawn(move || {
        let mut held = std::fs::File::open(&reader_fifo).unwrap();
        let mut rest = Vec::new();
        let _ = held.read_to_end(&mut rest);
        let _ = closed.send(());
    });

    let tools = Tools::discover()
        .unwrap()
        .with_timeout(Duration::from_millis(300))
        .with_tool("mkfs.ext4", &hung)
        .with_tool("blkid", &blkid)
        .with_tool("resize2fs", &failing);

    let started = Instant::now();
    let err = tools
        .mkfs(FsType::Ext4, Path::new("/dev/null"))
        .unwrap_err();
    let took = started.elapsed();
    match &err {
        Error::ToolTimedOut { tool, after } => {
            assert_eq!(tool, &hung.display().to_string());
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("a hung mkfs is ToolTimedOut, not {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "the deadline is kept: {took:?}"
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::DeadlineExceeded
    );
    all_closed
        .recv_timeout(Duration::from_secs(20))
        .expect("the process the hung tool started is killed with it");

    // Within the deadline, tools run as before: output parsed, failures with code and stderr.
    assert_eq!(
        tools.probe(Path::new("/dev/null")).unwrap(),
        Probe::FileSystem("ext4".into())
    );
    let err = FsType::Ext4
        .get()
        .grow_online(&tools, Path::new("/dev/null"))
        .unwrap_err();
    match err {
        Error::Tool { code, stderr, .. } => {
            assert_eq!(code, Some(3));
            assert_eq!(stderr, "no room");
        }
        other => panic!("a failing resize2fs is Error::Tool, not {other:?}"),
    }
}
