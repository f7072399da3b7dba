#!/usr/bin/env bash
# Builds loopcsi's container image as an OCI archive with no Docker daemon and no registry: the
# image the Dockerfile describes, assembled from the release binary and the Debian packages the
# Dockerfile installs.
#
#   deploy/image/build.sh [--binary PATH] [--name REF] [--debs DIR] OUT.tar
#   ctr -n k8s.io images import OUT.tar          # on each node (containerd's Kubernetes namespace)
#
# --binary  the driver to put in the image (default: `cargo build --release --locked` of this tree,
#           target/release/loopcsi). It must be linked against the glibc of the Dockerfile's
#           Debian release, as a build on that release is.
# --name    the image reference (default docker.io/library/loopcsi:v<Cargo.toml version>: the
#           manifests' image loopcsi:v<version> as the kubelet and containerd's CRI normalise it;
#           `ctr images import` names the image exactly as given, so the default is spelled out).
# --debs    where the fetched .deb files are kept between builds (default
#           ${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi-image/debs-<release>).
#
# What goes in, all read from the Dockerfile's runtime stage by dockerfile.py (which refuses
# instructions it would not reproduce): the binary at the COPY destination, the ENTRYPOINT, and
# the packages of the `apt-get install` line, fetched with `apt-get download` from this host's
# apt sources — so the host must run the Dockerfile's Debian release (checked) — and unpacked
# with dpkg-deb, together with the packages of every shared library their programs and the
# driver load, and base-files (which names the release, /etc/os-release). /var/lib/dpkg/status
# lists them, as in an image built by apt. What debian-slim adds beyond that (a shell, apt,
# coreutils) is left out: the driver never runs it. Env is Debian's PATH, as in the debian image.
# Needs apt-get, dpkg, dpkg-deb, ldd and python3; not root. tests/image.rs checks the result
# against the Dockerfile.
# shellcheck disable=SC2154  # base, release, packages, binary_path, entrypoint: from dockerfile.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

usage() {
    sed -n '6p' "$0" | sed 's/^#  *//' >&2
    exit 2
}
binary="" name="" debs="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --debs) debs="$2"; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "build.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out="$1"; shift ;;
    esac
done
[ -n "$out" ] || usage

# base, release, packages, binary_path, entrypoint: what the Dockerfile's runtime stage says.
dockerfile_facts="$(python3 "$here/dockerfile.py" "$repo/Dockerfile")"
eval "$dockerfile_facts"
# shellcheck source=/dev/null
host_release="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
if [ "$host_release" != "$release" ]; then
    echo "build.sh: the Dockerfile's runtime is Debian $release, this host runs '${host_release:-unknown}';" \
        "the packages come from this host's apt sources, so run this on Debian $release (or change the Dockerfile)" >&2
    exit 1
fi

if [ -z "$name" ]; then
    version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -1)"
    name="docker.io/library/loopcsi:v$version"
fi
if [ -z "$binary" ]; then
    (cd "$repo" && cargo build --release --locked --bin loopcsi)
    binary="$repo/target/release/loopcsi"
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }
debs="${debs:-${XDG_CACHE_HOME:-$HOME/.cache}/loopcsi-image/debs-$release}"
mkdir -p "$debs"
debs="$(cd "$debs" && pwd)"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rootfs="$(mktemp -d "${TMPDIR:-/tmp}/loopcsi-image.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT

# candidates PACKAGE...: "PACKAGE VERSION" for each, the version apt would install (one
# apt-cache call: each costs about a second).
candidates() {
    apt-cache policy "$@" | awk '/^[^ ].*:$/ {p = substr($1, 1, length($1) - 1)} $1 == "Candidate:" {print p, $2}'
}

# deb_of PACKAGE VERSION: the .deb of that version, fetched once (apt-get download names it
# PACKAGE_VERSION_ARCH.deb, with an epoch's colon escaped as %3a).
deb_of() {
    local p="$1" version="$2" file log
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        echo "build.sh: apt knows no candidate for $p (apt-get update?)" >&2
        return 1
    fi
    file="$(compgen -G "$debs/${p}_${version/:/%3a}_*.deb" | head -1 || true)"
    if [ -z "$file" ]; then
        # (apt warns on every download by root into a directory its _apt user cannot write.)
        log="$(cd "$debs" && apt-get download -qq "$p" 2>&1)" ||
            { echo "build.sh: apt-get download $p failed: $log" >&2; return 1; }
        file="$(compgen -G "$debs/${p}_${version/:/%3a}_*.deb" | head -1)"
    fi
    echo "$file"
}

# owners FILE...: the Debian packages that install the FILEs (dpkg knows each file under the
# path its package ships, /lib/... or /usr/lib/..., so both are asked).
owners() {
    local f paths=()
    for f in "$@"; do
        case "$f" in
        /usr/*) paths+=("$f" "${f#/usr}") ;;
        *) paths+=("$f" "/usr$f") ;;
        esac
    done
    dpkg -S "${paths[@]}" 2>/dev/null | cut -d: -f1 | sort -u
}

mkdir -p "$rootfs$(dirname "$binary_path")" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" \
    "$rootfs/dev" "$rootfs/var/lib/dpkg"
chmod 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs$binary_path"
status="$rootfs/var/lib/dpkg/status"
: >"$status"
declare -A unpacked=()
read -ra todo <<<"base-files $packages"
while [ ${#todo[@]} -gt 0 ]; do
    while read -r p version; do
        [ -n "${unpacked[$p]:-}" ] && continue
        unpacked[$p]=1
        deb="$(deb_of "$p" "$version")"
        dpkg-deb -x "$deb" "$rootfs"
        { dpkg-deb -f "$deb" | sed '/^Package:/a Status: install ok installed'; echo; } >>"$status"
    done < <(candidates "${todo[@]}")
    # The packages of the libraries the unpacked programs (and the driver) load, resolved on
    # this host (by the paths ldd names and the files they link to); those not unpacked yet are
    # the next round.
    mapfile -t libs < <(find "$rootfs" -type f -perm -u+x -print0 | xargs -0 ldd 2>/dev/null |
        sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^\s*\(\/lib64\/[^ ]*\) .*/\1/p' | sort -u)
    todo=()
    [ ${#libs[@]} -gt 0 ] || break
    mapfile -t -O ${#libs[@]} libs < <(readlink -f "${libs[@]}")
    for p in $(owners "${libs[@]}"); do
        [ -z "${unpacked[$p]:-}" ] && todo+=("$p")
    done
done
echo "build.sh: Debian $release packages: $(echo "${!unpacked[@]}" | tr ' ' '\n' | sort | tr '\n' ' ')" >&2
rm -rf "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/share/locale"

python3 "$here/oci.py" --rootfs "$rootfs" --name "$name" \
    "${entrypoint[@]/#/--entrypoint=}" \
    --annotation "org.opencontainers.image.base.name=$base" \
    --annotation "org.opencontainers.image.title=loopcsi" \
    --created-by "deploy/image/build.sh (the Dockerfile's runtime stage, from Debian packages)" \
    --out "$out"
