#!/usr/bin/env bash
# csi-sanity (github.com/kubernetes-csi/csi-test, cmd/csi-sanity) against a freshly started
# loopcsi in three configurations: filesystem ext4 (the default), filesystem xfs (chosen by the
# csi.storage.k8s.io/fstype parameter, as a StorageClass would) and raw block. Run as root from
# anywhere; CI runs it from .ci/run after `cargo test`.
#
# Every spec csi-sanity runs must pass. The one failure this script accepts is the machine's,
# not the driver's: online ext4 growth needs CAP_SYS_RESOURCE (the kernel's EXT4_IOC_RESIZE_FS
# check), so where the driver runs without it NodeExpandVolume of a published ext4 volume fails
# with resize2fs's EPERM. Such a failure is listed as "expected (machine limit)" only when the
# driver really lacks the capability and the failure's message says that and nothing else; no
# spec is skipped by name. The last line is `sanity: N passed, M failed` (M counts unexpected
# failures), and the exit status is non-zero when M > 0.
#
# Environment: CSI_TEST_VERSION (default below) picks the csi-sanity release; the binary is
# cached per version under ${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi/. SANITY_KEEP=1 keeps the
# work dir (logs, JUnit reports) for a look afterwards.
set -euo pipefail

# Go from the official tarball may not be on a non-login shell's PATH.
PATH=$PATH:/usr/local/go/bin
CSI_TEST_VERSION=${CSI_TEST_VERSION:-v5.6.0}
# Small, so the runs fit beside other work on a busy disk: above xfs's 300 MiB minimum, grown
# by 64 MiB in the expansion specs (csi-sanity's default is 10 GiB grown by 1 GiB, and the driver
# checks a growth of a thin volume against the pool's free space too). Thin volumes, so a run
# writes only what mkfs and the specs write.
VOLUME_SIZE=$((320 << 20))
EXPAND_SIZE=$((384 << 20))
NODE_ID=loopcsi-sanity

cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "tests/sanity/run.sh: run as root (loop devices, mkfs, mounts)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "tests/sanity/run.sh: needs python3 (reads the JUnit reports)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/loopcsi-sanity.XXXXXX")
driver_pid=

# Everything this script started or made, and nothing else: the driver it started (by PID),
# mounts under its own work dir, loop devices backed by images in its own state dirs (matched
# by the image's device and inode, not by a path), then the work dir itself.
cleanup() {
    local status=$?
    set +e
    if [ -n "$driver_pid" ] && kill -0 "$driver_pid" 2>/dev/null; then
        kill -TERM "$driver_pid"
        wait "$driver_pid"
    fi
    # Deepest first, so a bind inside a staging mount goes before the staging mount.
    local mnt
    while read -r mnt; do
        echo "cleanup: unmounting $mnt left by the run" >&2
        umount "$mnt"
    done < <(awk -v root="$work/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    local img ids dev
    for img in "$work"/*/state/volumes/*.img "$work"/*/state/snapshots/*.img; do
        [ -e "$img" ] || continue
        ids=$(stat -c '%Hd:%Ld %i' "$img")
        while read -r dev; do
            [ -n "$dev" ] || continue
            echo "cleanup: detaching $dev, attached to $img by the run" >&2
            losetup -d "$dev"
        done < <(attached_to "$ids")
    done
    if [ "${SANITY_KEEP:-0}" = 1 ]; then
        echo "sanity: work dir kept at $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The loop devices whose backing file is the file with identity "$1" ("MAJOR:MINOR INODE" of
# its file system and inode): the kernel's lo_device/lo_inode, which losetup prints.
attached_to() {
    losetup --list --noheadings --raw --output NAME,BACK-MAJ:MIN,BACK-INO |
        awk -v dev="${1% *}" -v ino="${1#* }" '{ gsub(/\\x20/, "", $2) } $2 == dev && $3 == ino { print $1 }'
}

# ---- csi-sanity, built once per version ----
cache=${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi/csi-sanity-$CSI_TEST_VERSION
sanity=$cache/csi-sanity
if [ ! -x "$sanity" ]; then
    command -v go >/dev/null || { echo "tests/sanity/run.sh: needs Go to build csi-sanity $CSI_TEST_VERSION" >&2; exit 1; }
    echo "sanity: building csi-sanity $CSI_TEST_VERSION into $cache"
    mkdir -p "$cache"
    # Into a temp dir first, so an interrupted build never leaves a half-written binary that
    # the next run would take for the cached one.
    gobin=$(mktemp -d "$cache/build.XXXXXX")
    GOBIN=$gobin GOFLAGS=-mod=mod go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_TEST_VERSION"
    mv "$gobin/csi-sanity" "$sanity"
    rmdir "$gobin"
fi

# ---- the driver: the debug build of the binary users get (no test-only crash points) ----
cargo build --quiet --bin loopcsi
driver=$PWD/target/debug/loopcsi

# CAP_SYS_RESOURCE is capability 24; /proc/PID/status shows the effective set in hex.
lacks_sys_resource() {
    local eff
    eff=$(awk '/^CapEff:/ { print $2 }' "/proc/$1/status")
    (((16#$eff >> 24 & 1) == 0))
}

total_passed=0
total_failed=0
total_expected=0
total_skipped=0
summary=()

# run_config NAME ACCESS_TYPE EXPECTED_KIND [csi-sanity flags...]
run_config() {
    local name=$1 access=$2 kind=$3
    shift 3
    local dir=$work/$name
    mkdir -p "$dir/state"
    echo
    echo "=== sanity: $name (pool $dir/state, $(df -m --output=avail "$dir" | tail -n 1 | tr -d ' ') MiB free) ==="
    RUST_LOG=${RUST_LOG:-info} "$driver" serve --endpoint "unix://$dir/csi.sock" --node-id "$NODE_ID" \
        --state-dir "$dir/state" >"$dir/driver.log" 2>&1 &
    driver_pid=$!
    local start=$SECONDS
    # csi-sanity waits (up to a minute) for the socket to accept connections, so no wait here.
    "$sanity" -csi.endpoint "unix://$dir/csi.sock" \
        -csi.stagingdir "$dir/staging" -csi.mountdir "$dir/target" \
        -csi.testvolumeaccesstype "$access" -csi.testvolumesize "$VOLUME_SIZE" \
        -csi.testvolumeexpandsize "$EXPAND_SIZE" \
        -ginkgo.no-color -ginkgo.junit-report "$dir/junit.xml" "$@" 2>&1 | tee "$dir/sanity.log" || true
    local seconds=$((SECONDS - start))
    local alive=yes lacks=no stopped=yes
    kill -0 "$driver_pid" 2>/dev/null || alive=no
    if [ "$alive" = yes ] && lacks_sys_resource "$driver_pid"; then lacks=yes; fi
    if [ "$alive" = yes ]; then
        kill -TERM "$driver_pid"
        wait "$driver_pid" || stopped=no
    fi
    driver_pid=
    local counts
    counts=$(python3 - "$dir/junit.xml" "$name" "$kind" "$lacks" "$dir/driver.log" <<'PY'
import re, sys, xml.etree.ElementTree as ET
junit, name, kind, lacks, log = sys.argv[1:]
try:
    cases = ET.parse(junit).getroot().iter("testcase")
except (OSError, ET.ParseError) as err:
    print(f"  no JUnit report ({err}): csi-sanity did not finish")
    print("COUNTS 0 1 0 0")
    sys.exit()
passed = skipped = pending = 0
expected, unexpected = [], []
for case in cases:
    status = case.get("status")
    spec = case.get("name", "").removeprefix("[It] ")
    if status == "passed":
        passed += 1
    elif status == "skipped":
        skipped += 1
    elif status == "pending":
        pending += 1
    else:
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        text = "" if failure is None else (failure.get("message", "") + "\n" + (failure.text or ""))
        # The machine's limit, recognised by what it is: an ext4 run, a driver that really has
        # no CAP_SYS_RESOURCE, a NodeExpandVolume spec, and the failure carrying resize2fs's own
        # EPERM text with the driver's FAILED_PRECONDITION that names the capability.
        machine_limit = (
            kind == "Filesystem(Ext4)"
            and lacks == "yes"
            and spec.startswith("Node Service NodeExpandVolume ")
            and "code = FailedPrecondition" in text
            and "lacks CAP_SYS_RESOURCE" in text
            and "Permission denied to resize filesystem" in text
        )
        first = next((l.strip() for l in text.splitlines() if "rpc error" in l), text.strip()[:300])
        (expected if machine_limit else unexpected).append((spec, first))
# The configuration really is what it says: every volume the driver made is of this kind.
made = re.findall(r"volume\.kind=(\S+)", open(log, errors="replace").read())
wrong = sorted(set(k for k in made if k != kind))
if not made or wrong:
    unexpected.append((f"the driver made volumes of kind {wrong or 'none'}, not {kind}", ""))
print(f"  {name}: {passed} passed, {len(unexpected)} failed, {len(expected)} expected (machine limit), "
      f"{skipped} skipped, {pending} pending")
for spec, why in expected:
    print(f"  expected (machine limit: no CAP_SYS_RESOURCE, online ext4 growth refused with EPERM): {spec}")
for spec, why in unexpected:
    print(f"  FAILED: {spec}" + (f"\n          {why}" if why else ""))
print(f"COUNTS {passed} {len(unexpected)} {len(expected)} {skipped}")
PY
)
    grep -v '^COUNTS ' <<<"$counts" | sed 's/^  /    /' >"$dir/summary"
    local p f e s
    read -r _ p f e s < <(grep '^COUNTS ' <<<"$counts")
    if [ "$alive" = no ] || [ "$stopped" = no ]; then
        if [ "$alive" = no ]; then
            echo "    FAILED: the driver exited during the run; the end of its log:"
        else
            echo "    FAILED: the driver did not stop cleanly on SIGTERM; the end of its log:"
        fi >>"$dir/summary"
        tail -n 30 "$dir/driver.log" | sed 's/^/      /' >>"$dir/summary"
        f=$((f + 1))
    fi
    echo "  ($name took ${seconds}s)" >>"$dir/summary"
    cat "$dir/summary"
    summary+=("$(cat "$dir/summary")")
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + f))
    total_expected=$((total_expected + e))
    total_skipped=$((total_skipped + s))
}

printf 'csi.storage.k8s.io/fstype: xfs\n' >"$work/xfs.yaml"

run_config filesystem-ext4 mount 'Filesystem(Ext4)'
run_config filesystem-xfs mount 'Filesystem(Xfs)' -csi.testvolumeparameters "$work/xfs.yaml"
run_config block block 'Block'

# Nothing the runs made may outlive them: csi-sanity deletes its volumes, so a mount or a loop
# device still here is a leak (reported by path; the cleanup above removes it by identity).
leaks=$(awk -v root="$work/" 'index($5, root) == 1 { print "mount " $5 }' /proc/self/mountinfo
    losetup --list --noheadings --raw --output NAME,BACK-FILE | awk -v root="$work/" 'index($2, root) == 1 { print "loop device " $1 " on " $2 }')
if [ -n "$leaks" ]; then
    echo "FAILED: left behind after the runs:"
    sed 's/^/    /' <<<"$leaks"
    total_failed=$((total_failed + 1))
fi

echo
echo "=== sanity: csi-sanity $CSI_TEST_VERSION against loopcsi $(git rev-parse --short HEAD 2>/dev/null || echo '?') ==="
printf '%s\n' "${summary[@]}"
echo "sanity: $total_expected expected failure(s) (machine limit), $total_skipped skipped by csi-sanity (capability not advertised)"
echo "sanity: $total_passed passed, $total_failed failed"
[ "$total_failed" = 0 ]
