#!/usr/bin/env python3
"""Fetch the pinned llama.cpp tree (vendored in the llama-cpp-python sdist) by package name.

The sdist is downloaded once with pip into a cache directory and unpacked there;
builds copy the pristine tree and patch the copy, so the cache is never modified.

    python native/fetch_llama.py            # prints the path of the pristine tree
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
LLAMA_COMMIT = "0c1e570"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
TREE_IN_SDIST = f"llama_cpp_python-{VERSION}/vendor/llama.cpp"


def cache_dir() -> Path:
    root = os.environ.get("DYSCO_CACHE") or Path.home() / ".cache" / "dysco-edge"
    return Path(root)


def download_sdist(dest: Path) -> Path:
    sdist = dest / SDIST_NAME
    if sdist.exists():
        return sdist
    dest.mkdir(parents=True, exist_ok=True)
    print(f"-- dysco-edge: downloading {PACKAGE}=={VERSION} sdist (llama.cpp {LLAMA_COMMIT}) into {dest}",
          file=sys.stderr, flush=True)
    args = ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    # inside pip's isolated build environment pip itself is hidden by PYTHONPATH/PYTHONNOUSERSITE:
    # run it with those removed, from this interpreter, else from PATH
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    attempts = [[sys.executable, "-m", "pip"]] + [[exe] for exe in map(shutil.which, ("pip3", "pip")) if exe]
    for pip in attempts:
        result = subprocess.run(pip + args, capture_output=True, text=True, env=env)
        if sdist.exists():
            return sdist
    sys.stderr.write(result.stdout + result.stderr)
    raise SystemExit(f"dysco-edge: could not download {PACKAGE}=={VERSION} with pip "
                     f"(exit {result.returncode}); set DYSCO_LLAMA_SRC to a llama.cpp {LLAMA_COMMIT} tree instead")


def unpack_tree(sdist: Path, dest: Path) -> Path:
    tree = dest / f"llama.cpp-{LLAMA_COMMIT}"
    marker = tree / ".dysco-complete"
    if marker.exists():
        return tree
    tmp = dest / f".unpack-{os.getpid()}"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(TREE_IN_SDIST + "/")]
        tar.extractall(tmp, members=members, filter="data")
    if not tree.exists():
        (tmp / TREE_IN_SDIST).rename(tree)
    shutil.rmtree(tmp, ignore_errors=True)
    marker.touch()
    return tree


def pristine_tree() -> Path:
    override = os.environ.get("DYSCO_LLAMA_SRC")
    if override:
        return Path(override)
    cache = cache_dir()
    return unpack_tree(download_sdist(cache / "sdist"), cache)


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(pristine_tree())


if __name__ == "__main__":
    main()
