#!/usr/bin/env python3
"""Writes a single-layer OCI image archive (an OCI image layout in a tar) from a root file system
directory, with no Docker daemon and no registry: `ctr -n k8s.io images import` reads it.

    oci.py --rootfs DIR --name loopcsi:v0.1.0 --entrypoint loopcsi [--env PATH=...] \
        [--annotation KEY=VALUE]... [--created-by TEXT] --out image.tar

The config's Env always starts with Debian's PATH (what a debian image sets); --annotation goes
on the manifest (e.g. org.opencontainers.image.base.name). Used by deploy/image/build.sh and by
the e2e tier's test images (tests/e2e/images.sh).

Files are stored as root:root with their modes and a fixed mtime, so the same tree gives the same
digest.
"""

import argparse
import hashlib
import io
import json
import os
import tarfile

MTIME = 0


def layer_tar(rootfs: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                info = tar.gettarinfo(path, arcname=os.path.relpath(path, rootfs))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = MTIME
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return buf.getvalue()


def blob(out: tarfile.TarFile, data: bytes, media_type: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mtime = MTIME
    out.addfile(info, io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def file(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    out.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", required=True)
    parser.add_argument("--name", required=True, help="the full reference, e.g. host/repo:tag")
    parser.add_argument("--entrypoint", required=True, action="append")
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--annotation", action="append", default=[], help="KEY=VALUE, on the manifest")
    parser.add_argument("--created-by", default="deploy/image/oci.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    layer = layer_tar(args.rootfs)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *args.env]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": args.entrypoint, "Env": env, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": args.created_by}],
    }
    with tarfile.open(args.out + ".tmp", mode="w", format=tarfile.PAX_FORMAT) as out:
        file(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        layer_desc = blob(out, layer, "application/vnd.oci.image.layer.v1.tar")
        config_desc = blob(
            out, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json"
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        if args.annotation:
            manifest["annotations"] = dict(a.split("=", 1) for a in args.annotation)
        manifest_desc = blob(
            out, json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
        manifest_desc["annotations"] = {
            # ctr import names the image from this annotation.
            "io.containerd.image.name": args.name,
            "org.opencontainers.image.ref.name": args.name.rsplit(":", 1)[-1],
        }
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
        file(out, "index.json", json.dumps(index, sort_keys=True).encode())
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.name} {manifest_desc['digest']} ({len(layer) // 1024} KiB)")


if __name__ == "__main__":
    main()
