"""Places installed distributions (and everything they require) into another environment's site-packages as
hard links, so that a second virtual environment gets the same torch without a second copy on disk.

    python tools/link_dists.py DEST_SITE_PACKAGES torch [more names...]

Run it with the python of the environment that holds the distributions (the source).  Every file a distribution
lists in its RECORD that lies inside the source site-packages is hard-linked (copied where a link is impossible,
e.g. across file systems) to the same relative path under DEST_SITE_PACKAGES; console scripts and other files
outside site-packages are skipped.  Requirements are followed through their markers and the extras they ask
for; a distribution of the same name already in DEST (a fresh venv's own setuptools) is removed first.  So the
result is what `pip install torch==<same version>` would have installed, minus the download and the disk space.

Why: .ci/run's wheel check installs the built wheel into a fresh venv "with only the same torch".  A second pip
install of the CUDA build of torch costs ~5.7 GB; on a shared CI disk that was once the difference between green
and "No space left on device".  Hard links share the blocks.  pip never writes into an installed file (it
replaces files), and Python writes .pyc files by rename, so the source environment is never modified through
a link; the destination can be removed with rm -rf as usual.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import sys
import sysconfig


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> list[md.Distribution]:
    """The distributions named by roots and, recursively, every requirement whose marker holds, following the
    extras a requirement asks for (torch asks for cuda-toolkit[cublas,cudart,...])."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) pairs whose requirements were followed
    todo = [(name, "") for name in roots]
    while todo:
        raw, extra = todo.pop()
        name = _canon(raw)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        if name not in seen:
            try:
                seen[name] = md.distribution(name)
            except md.PackageNotFoundError:
                raise SystemExit(f"link_dists: {name!r} is required but not installed in {sys.prefix}")
        for spec in seen[name].requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo.append((req.name, ""))
                todo.extend((req.name, _canon(e)) for e in req.extras)
    return list(seen.values())


def remove_existing(dists: list[md.Distribution], dest: str) -> list[str]:
    """Removes from dest every distribution that has the name of one in dists (its RECORD files and its
    .dist-info), so that no two versions of one distribution stand side by side.  Returns "name==version"s."""
    names = {_canon(d.metadata["Name"]) for d in dists}
    removed = []
    for old in list(md.distributions(path=[dest])):
        name, version, files = old.metadata["Name"] or "", old.version, list(old.files or [])  # before deleting
        if _canon(name) not in names:
            continue
        for f in files:
            p = os.path.realpath(os.path.join(dest, f))
            if p.startswith(dest + os.sep) and os.path.isfile(p):
                os.unlink(p)
        for info in {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}:
            shutil.rmtree(os.path.join(dest, info), ignore_errors=True)
        removed.append(f"{name}=={version}")
    return removed


def link_tree(dists: list[md.Distribution], dest: str) -> tuple[int, int]:
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    linked = copied = 0
    for dist in dists:
        for f in dist.files or []:
            src = os.path.realpath(f.locate())
            if not src.startswith(site + os.sep) or not os.path.isfile(src):
                continue  # console scripts (../../bin), files RECORD lists but the install no longer has
            rel = os.path.relpath(src, site)
            if "__pycache__" in rel.split(os.sep):
                continue
            dst = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.lexists(dst):
                os.unlink(dst)
            try:
                os.link(src, dst)
                linked += 1
            except OSError:
                shutil.copy2(src, dst)
                copied += 1
    return linked, copied


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: python tools/link_dists.py DEST_SITE_PACKAGES DIST [DIST...]", file=sys.stderr)
        return 2
    dest = os.path.realpath(argv[1])
    if not os.path.isdir(dest):
        raise SystemExit(f"link_dists: DEST_SITE_PACKAGES {argv[1]!r} is not a directory")
    if dest == os.path.realpath(sysconfig.get_paths()["purelib"]):
        raise SystemExit("link_dists: DEST_SITE_PACKAGES is this environment's own site-packages")
    dists = closure(argv[2:])
    removed = remove_existing(dists, dest)
    if removed:
        print(f"link_dists: removed from DEST first: {', '.join(sorted(removed))}")
    linked, copied = link_tree(dists, dest)
    names = ", ".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in dists))
    print(f"link_dists: {len(dists)} distributions, {linked} files hard-linked, {copied} copied -> {dest}")
    print(f"link_dists: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
