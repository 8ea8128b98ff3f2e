"""Build the demo model's training text: Jane Austen's six completed novels as one UTF-8 file (~4 MB).

    python -m scripts.prepare_demo_data                       # runs `apt-get download r-cran-janeaustenr`
    python -m scripts.prepare_demo_data --deb r-cran-janeaustenr_1.0.0-1_all.deb --out data/austen.txt

Source: Debian's ``r-cran-janeaustenr`` 1.0.0-1 (CRAN package janeaustenr by Julia Silge, MIT licence;
the novels themselves are public domain, their text from Project Gutenberg). The .deb is checked
against its pinned SHA-256, unpacked in Python (ar + tar), and the novels are read out of the R package's
lazy-load database (data/Rdata.rdx index + Rdata.rdb zlib records, R's XDR serialisation) with the
small reader below, so neither R nor dpkg is needed. The output is byte-for-byte reproducible: one
novel after another in publication order, lines joined by newlines, novels separated by blank lines
(4,025,044 bytes, SHA-256 7a590c6b3577dbc25d958b3d1798965f91272f4be41db8041a350060016adf33).
The text file is not committed (data/.gitignore); the training script reads it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

PACKAGE = "r-cran-janeaustenr"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"  # 1.0.0-1_all
DATA_DIR = "./usr/lib/R/site-library/janeaustenr/data/"
# Publication order; the held-out split of scripts/train.py is the end of the file (Persuasion).
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
NOVEL_SEPARATOR = "\n\n\n\n"


class DataError(ValueError):
    """The source package is missing, altered or not in the expected format."""


def deb_members(deb: bytes) -> dict[str, bytes]:
    """The members of a .deb (an ar archive): name -> bytes."""
    if not deb.startswith(b"!<arch>\n"):
        raise DataError("not a Debian package (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[name] = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def package_files(deb: bytes, names: list[str]) -> dict[str, bytes]:
    """The named files (paths as in the package's data.tar) from a .deb."""
    members = deb_members(deb)
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise DataError("the package has no data.tar member")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {n: tar.extractfile(n).read() for n in names}


class RReader:
    """Reads R's XDR serialisation format (version 2 or 3) for the object types a text package holds:
    NULL, symbols, pairlists (attributes), character / integer / logical / double vectors and lists."""

    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise DataError("not an R XDR serialisation")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader R versions
        if version == 3:
            n = self._int()
            self.pos += n  # native encoding name

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self):
        """The next object: None, str, list, or (values, attributes) for vectors."""
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == self.NIL:
            return None
        if kind == self.REF:
            return self.refs[(flags >> 8) - 1]
        if kind == self.SYM:
            name = self.read()
            self.refs.append(name)
            return name
        if kind == self.CHAR:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            text = self.data[self.pos:self.pos + n].decode("utf-8" if flags & (1 << 15) else "latin-1")
            self.pos += n
            return text
        if kind == self.LIST:  # pairlist: [attributes], [tag], value, rest
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            value = self.read()
            return [(tag, value)] + (self.read() or [])
        if kind in (self.STR, self.VEC, self.INT, self.LGL, self.REAL):
            n = self._int()
            if kind in (self.STR, self.VEC):
                values = [self.read() for _ in range(n)]
            else:
                fmt, width = (">%dd" % n, 8) if kind == self.REAL else (">%di" % n, 4)
                values = list(struct.unpack_from(fmt, self.data, self.pos))
                self.pos += width * n
            attrs = dict(self.read()) if has_attr else {}
            return values, attrs
        raise DataError(f"unsupported R object type {kind}")


def read_object(data: bytes):
    return RReader(data).read()


def lazyload_objects(rdx: bytes, rdb: bytes) -> dict:
    """name -> object of an R lazy-load database (.rdx: gzip'd index of byte ranges into .rdb, whose
    records are a 4-byte big-endian length followed by the zlib-compressed serialisation)."""
    index, index_names = read_object(gzip.decompress(rdx))
    variables = dict(zip(index_names["names"][0], index))["variables"]
    out = {}
    for name, ((offset, length), _) in zip(variables[1]["names"][0], variables[0]):
        record = rdb[offset:offset + length]
        (size,) = struct.unpack(">i", record[:4])
        body = zlib.decompress(record[4:])
        if len(body) != size:
            raise DataError(f"R database record {name} is corrupt")
        out[name] = read_object(body)
    return out


def austen_text(deb: bytes) -> str:
    """The six novels from the package bytes; each novel is an R character vector of lines."""
    digest = hashlib.sha256(deb).hexdigest()
    if digest != DEB_SHA256:
        raise DataError(f"the {PACKAGE} package has SHA-256 {digest}, expected {DEB_SHA256} (version 1.0.0-1)")
    files = package_files(deb, [DATA_DIR + "Rdata.rdx", DATA_DIR + "Rdata.rdb"])
    objects = lazyload_objects(files[DATA_DIR + "Rdata.rdx"], files[DATA_DIR + "Rdata.rdb"])
    novels = ["\n".join(line or "" for line in objects[name][0]).strip("\n") for name in NOVELS]
    return NOVEL_SEPARATOR.join(novels) + "\n"


def download_deb(directory: Path) -> Path:
    subprocess.run(["apt-get", "download", PACKAGE], cwd=directory, check=True, stdout=subprocess.DEVNULL)
    return next(directory.glob(f"{PACKAGE}_*.deb"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.prepare_demo_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--deb", type=Path, help=f"the {PACKAGE} .deb (default: apt-get download it)")
    p.add_argument("--out", type=Path, default=Path("data/austen.txt"))
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            deb_path = args.deb or download_deb(Path(tmp))
            if not deb_path.is_file():
                raise DataError(f"--deb {deb_path} does not exist")
            text = austen_text(deb_path.read_bytes())
    except (DataError, OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text.encode()):,} bytes, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
