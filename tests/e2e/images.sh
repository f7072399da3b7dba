#!/usr/bin/env bash
# Builds the e2e tier's container images as OCI archives, with no Docker daemon and no registry:
#
#   tests/e2e/images.sh OUT_DIR RELEASE_BINARY SIDECAR_DIR...
#
#   loopcsi.tar  loopcsi.dev/loopcsi:e2e — built by deploy/image/build.sh, the users' command:
#                the Dockerfile's runtime stage assembled from RELEASE_BINARY and Debian packages.
#   busybox.tar  loopcsi.dev/e2e/busybox:1.35 — Debian's busybox-static, the app pods' image.
#   pause-e2e.tar  loopcsi.dev/e2e/pause:e2e — the pod sandbox (standins/pause, a SIDECAR_DIR).
#   <name>-<version>.tar  loopcsi.dev/e2e/<name>:<version> — one per binary in each SIDECAR_DIR
#                (named <name>-<version>: the version is what follows the last dash), so two
#                versions of one sidecar can be imported side by side.
#
# Debian packages are fetched with `apt-get download` into $E2E_DEBS (default OUT_DIR/debs; run.sh
# keeps them in the build cache).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
oci="$here/../../deploy/image/oci.py"
out="$1"
binary="$2"
shift 2
debs="${E2E_DEBS:-$out/debs}"
mkdir -p "$out" "$debs"
out="$(cd "$out" && pwd)"
debs="$(cd "$debs" && pwd)"

# fetch PACKAGE...: the .deb of each package (the candidate version), once.
fetch() {
    local p
    for p in "$@"; do
        compgen -G "$debs/${p}_*.deb" >/dev/null || (cd "$debs" && apt-get download -qq "$p" 2>/dev/null)
    done
}

# --- loopcsi: the user's image builder (the Dockerfile's runtime stage from Debian packages),
# under the tier's own name.
"$here/../../deploy/image/build.sh" --binary "$binary" --name loopcsi.dev/loopcsi:e2e \
    --debs "$debs" "$out/loopcsi.tar"

# --- busybox: the static busybox and a link per applet.
rootfs="$out/rootfs-busybox"
rm -rf "$rootfs"
fetch busybox-static
dpkg-deb -x "$(compgen -G "$debs/busybox-static_*.deb" | head -1)" "$rootfs.deb"
mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/etc"
install -m 0755 "$rootfs.deb/bin/busybox" "$rootfs/bin/busybox"
rm -rf "$rootfs.deb"
for applet in $("$rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
python3 "$oci" --rootfs "$rootfs" --name loopcsi.dev/e2e/busybox:1.35 \
    --entrypoint /bin/sh --out "$out/busybox.tar"
rm -rf "$rootfs"

# --- one image per static binary: pause and the sidecars (DIR/NAME, version from DIR's name).
for dir in "$@"; do
    version="${dir##*-}"
    for bin in "$dir"/*; do
        [ -f "$bin" ] && [ -x "$bin" ] || continue
        name="$(basename "$bin")"
        rootfs="$out/rootfs-$name"
        rm -rf "$rootfs"
        mkdir -p "$rootfs/tmp"
        chmod 1777 "$rootfs/tmp"
        install -m 0755 "$bin" "$rootfs/$name"
        python3 "$oci" --rootfs "$rootfs" --name "loopcsi.dev/e2e/$name:$version" \
            --entrypoint "/$name" --out "$out/$name-$version.tar"
        rm -rf "$rootfs"
    done
done
