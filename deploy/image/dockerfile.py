#!/usr/bin/env python3
"""Reads what the Dockerfile's runtime stage puts in the image, for deploy/image/build.sh, which
assembles the same image without Docker:

    dockerfile.py Dockerfile     # prints shell assignments: base, release, packages,
                                 # binary_path, entrypoint (an array)

It understands exactly the instructions the runtime stage uses today (FROM, ARG, one RUN of
apt-get install, COPY of the binary from the builder stage, ENTRYPOINT) and fails on anything
else (USER, ENV, LABEL, CMD, WORKDIR, EXPOSE, VOLUME, another RUN, ...), so that a Dockerfile
change the builder would not reproduce stops the build instead of making a different image.
tests/image.rs checks a built archive against the Dockerfile with a parser of its own.
"""

import json
import re
import shlex
import sys


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line:
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def fail(why: str) -> None:
    print(f"dockerfile.py: {why}; teach deploy/image/build.sh (and tests/image.rs) to do the same", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    steps = instructions(open(sys.argv[1]).read())
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in steps:
        if keyword == "FROM":
            stages.append([])
        if not stages:
            if keyword == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                args[key] = value
            continue
        stages[-1].append((keyword, rest))

    def expand(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s)

    runtime = stages[-1]
    base = expand(runtime[0][1])
    m = re.fullmatch(r"debian:(\w+)-slim", base)
    if not m:
        fail(f"the runtime stage is FROM {base}, not debian:<release>-slim")
    out = {"base": base, "release": m.group(1)}
    entrypoint = None
    for keyword, rest in runtime[1:]:
        if keyword == "ARG" and rest == "DEBIAN_FRONTEND=noninteractive":
            continue
        if keyword == "RUN":
            install = re.fullmatch(
                r"apt-get update && apt-get install -y --no-install-recommends ([a-z0-9.+\- ]+?)"
                r" && rm -rf /var/lib/apt/lists/\*",
                rest,
            )
            if not install or "packages" in out:
                fail(f"RUN {rest}")
            out["packages"] = install.group(1)
            continue
        if keyword == "COPY":
            copy = re.fullmatch(r"--from=builder (\S+) (/\S+)", rest)
            if not copy or "binary_path" in out:
                fail(f"COPY {rest}")
            out["binary_path"] = copy.group(2)
            continue
        if keyword == "ENTRYPOINT":
            entrypoint = json.loads(rest)
            if not (isinstance(entrypoint, list) and all(isinstance(a, str) for a in entrypoint)):
                fail(f"ENTRYPOINT {rest} (only the exec form)")
            continue
        fail(f"the runtime stage has {keyword} {rest}")
    for key in ("packages", "binary_path"):
        if key not in out:
            fail(f"no {key} in the runtime stage")
    if not entrypoint:
        fail("no ENTRYPOINT")
    for key, value in out.items():
        print(f"{key}={shlex.quote(value)}")
    print("entrypoint=(" + " ".join(shlex.quote(a) for a in entrypoint) + ")")


if __name__ == "__main__":
    main()
