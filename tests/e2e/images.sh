#!/usr/bin/env bash
# Builds the e2e tier's container images as OCI archives, with no Docker daemon and no registry:
#
#   tests/e2e/images.sh OUT_DIR RELEASE_BINARY SIDECAR_DIR...
#
#   loopcsi.tar  loopcsi.dev/loopcsi:e2e — the release binary at /usr/local/bin/loopcsi plus the
#                Debian packages the Dockerfile installs (e2fsprogs xfsprogs util-linux) and the
#                packages of the shared libraries their programs and the binary load, unpacked
#                with dpkg-deb (the image is the Dockerfile's minus what debian-slim adds and the
#                driver never runs).
#   busybox.tar  loopcsi.dev/e2e/busybox:1.35 — Debian's busybox-static, the app pods' image.
#   pause.tar    loopcsi.dev/e2e/pause:e2e — the pod sandbox (standins/pause).
#   <name>.tar   loopcsi.dev/e2e/<name>:<version> — one per sidecar binary in each SIDECAR_DIR.
#
# Debian packages are fetched with `apt-get download` into $E2E_DEBS (default OUT_DIR/debs; run.sh
# keeps them in the build cache).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
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

# owner FILE: the Debian package that installs FILE (the host is the Dockerfile's Debian release;
# dpkg knows each file under the path its package ships, /lib/... or /usr/lib/...).
owner() {
    local f="$1" alt
    case "$f" in
    /usr/*) alt="${f#/usr}" ;;
    *) alt="/usr$f" ;;
    esac
    dpkg -S "$f" 2>/dev/null | head -1 | cut -d: -f1 ||
        dpkg -S "$alt" 2>/dev/null | head -1 | cut -d: -f1
}

# --- loopcsi: the packages the Dockerfile installs, then the packages of every library loaded.
rootfs="$out/rootfs-loopcsi"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
chmod 1777 "$rootfs/tmp"
packages="$(sed -n 's/.*apt-get install -y --no-install-recommends \(.*\) \\$/\1/p' "$here/../../Dockerfile")"
[ -n "$packages" ] || { echo "images.sh: no package list found in the Dockerfile" >&2; exit 1; }
install -m 0755 "$binary" "$rootfs/usr/local/bin/loopcsi"
declare -A done_pkgs=()
todo="$packages"
while [ -n "$todo" ]; do
    next=""
    for p in $todo; do
        [ -n "${done_pkgs[$p]:-}" ] && continue
        done_pkgs[$p]=1
        fetch "$p"
        dpkg-deb -x "$(compgen -G "$debs/${p}_*.deb" | head -1)" "$rootfs"
    done
    # Libraries the unpacked programs (and the driver) load, resolved on the host.
    for lib in $(find "$rootfs" -type f -perm -u+x -print0 | xargs -0 ldd 2>/dev/null |
        sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^\s*\(\/lib64\/[^ ]*\) .*/\1/p' | sort -u); do
        p="$(owner "$(readlink -f "$lib")")"
        [ -z "$p" ] && p="$(owner "$lib")"
        [ -n "$p" ] && [ -z "${done_pkgs[${p%%:*}]:-}" ] && next="$next ${p%%:*}"
    done
    todo="$(echo "$next" | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/^ *//')"
done
echo "loopcsi image packages: ${!done_pkgs[*]}" >&2
rm -rf "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/share/locale"
python3 "$here/oci.py" --rootfs "$rootfs" --name loopcsi.dev/loopcsi:e2e \
    --entrypoint /usr/local/bin/loopcsi --out "$out/loopcsi.tar"
rm -rf "$rootfs"

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
python3 "$here/oci.py" --rootfs "$rootfs" --name loopcsi.dev/e2e/busybox:1.35 \
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
        python3 "$here/oci.py" --rootfs "$rootfs" --name "loopcsi.dev/e2e/$name:$version" \
            --entrypoint "/$name" --out "$out/$name.tar"
        rm -rf "$rootfs"
    done
done
