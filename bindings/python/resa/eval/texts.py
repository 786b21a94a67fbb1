# SPDX-License-Identifier: MIT
"""Turns the files of the Debian packages that scripts/fetch-texts.sh downloads into
plain UTF-8 prose, one text per file.  Standard library only, so the script can run it
by path (``python3 texts.py KIND ARGS... OUT``) before libresa or torch exist.

Texts (package, version and licence are pinned in scripts/fetch-texts.sh):
- ``austen-*``: Jane Austen's novels from r-cran-janeaustenr (R lazy-load database
  ``data/Rdata.rdb``: a character vector of lines per novel).  Public-domain text; the
  package is MIT.  Hard-wrapped lines are joined into one line per paragraph.
- ``debian-reference``: the Debian Reference (plain-text edition) from debian-reference-en,
  GPL-2+.  From the "Preface" heading on (the table of contents is dropped); kept as
  written otherwise (its 4-space indentation, tables and shell examples included).
- ``kjv-genesis``: the King James Version's Genesis from bible-kjv-text, printed by the
  package's own ``bible`` program; verse references dropped, one verse a line, a blank
  line between chapters.  The KJV text is public domain (the package's programs GPL-2+).
"""
import gzip
import re
import struct
import subprocess
import sys
import zlib
import bz2
import lzma

# ---------------------------------------------------------------------------------------
# A minimal reader of R's serialization format (XDR, versions 2 and 3), enough for the
# lazy-load database of a data-only package: character/integer/real/logical vectors,
# lists, pairlists, symbols and attributes.


class _RList(list):
    """An R vector with attributes (``.attrs``: dict name -> value)."""
    attrs = None


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos, self.refs = buf, 0, []

    def _int(self):
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n):
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def _length(self):
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def header(self):
        if self._bytes(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self._int()
        self._int(), self._int()
        if version == 3:
            self._bytes(self._int())   # native encoding name
        return self

    def _pairlist(self, flags):
        items, attrs = [], None
        while True:
            if flags & (1 << 9):
                attrs = self.item()
            tag = self.item() if flags & (1 << 10) else None
            items.append((tag, self.item()))
            flags = self._int()
            if flags & 0xFF == 254:    # NILVALUE_SXP ends the chain
                break
            if flags & 0xFF not in (2, 239):
                raise ValueError(f"pairlist tail of R type {flags & 0xFF}")
        out = _RList(v for _, v in items)
        out.attrs = {t: v for t, v in items}
        if attrs is not None:
            out.attrs["__attributes__"] = attrs
        return out

    def item(self):
        flags = self._int()
        kind = flags & 0xFF
        if kind == 254:                           # NILVALUE_SXP
            return None
        if kind in (253, 252, 251, 250, 242, 241):  # global/base/empty env, markers
            return f"<R special {kind}>"
        if kind == 255:                           # REFSXP
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind in (247, 248, 249):               # persistent/package/namespace
            if self._int() != 0:
                raise ValueError("unexpected persistent-name form")
            value = ("<R namespace>", [self.item() for _ in range(self._int())])
            self.refs.append(value)
            return value
        if kind == 1:                             # SYMSXP
            value = self.item()
            self.refs.append(value)
            return value
        if kind in (2, 239):                      # LISTSXP, ATTRLISTSXP
            return self._pairlist(flags)
        if kind == 9:                             # CHARSXP
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", "replace")
        if kind in (10, 13):                      # LGLSXP, INTSXP
            n = self._length()
            value = _RList(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
        elif kind == 14:                          # REALSXP
            n = self._length()
            value = _RList(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):                # STRSXP, VECSXP, EXPRSXP
            value = _RList(self.item() for _ in range(self._length()))
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        if flags & (1 << 9):
            attrs = self.item()
            value.attrs = dict(attrs.attrs) if attrs is not None else {}
        return value


def _decompress(blob, compressed):
    if compressed in (1, True):
        return zlib.decompress(blob[4:])
    codec = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
             b"0": lambda b: b}[blob[4:5]]
    return codec(blob[5:])


def read_lazyload(rdx_path, rdb_path):
    """{name: value} of every variable in an R lazy-load database (NAME.rdx + NAME.rdb)."""
    with open(rdx_path, "rb") as f:
        raw = f.read()
    index = _Reader(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    index = index.header().item()
    top = dict(zip(index.attrs["names"], index))
    compressed = top.get("compressed", [1])
    compressed = compressed[0] if isinstance(compressed, list) else compressed
    variables = top["variables"]
    with open(rdb_path, "rb") as f:
        rdb = f.read()
    out = {}
    for name, (offset, length) in zip(variables.attrs["names"], variables):
        out[name] = _Reader(_decompress(rdb[offset:offset + length], compressed)).header().item()
    return out


# ---------------------------------------------------------------------------------------
# The texts

def unwrap(lines):
    """Joins hard-wrapped lines into one line per paragraph (paragraphs were separated by
    blank lines); runs of blank lines become one blank line; lines are right-stripped."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").rstrip()
        if line.strip():
            current.append(line.strip() if current else line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def austen(rdx_path, rdb_path, novel):
    data = read_lazyload(rdx_path, rdb_path)
    if novel not in data:
        raise SystemExit(f"no novel {novel!r} in {rdb_path}; have {sorted(data)}")
    return unwrap(data[novel])


def debian_reference(txt_gz_path):
    with gzip.open(txt_gz_path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    # The second "Preface" line at column 0 starts the body (the first is in the TOC).
    starts = [i for i, line in enumerate(lines) if line == "Preface"]
    if len(starts) < 2:
        raise SystemExit(f"{txt_gz_path}: no 'Preface' heading after the table of contents")
    body = "\n".join(line.rstrip() for line in lines[starts[1]:])
    return re.sub(r"\n{3,}", "\n\n", body).strip("\n") + "\n"


def kjv(bible_program, data_dir, reference="Gen1:1-Gen50:26"):
    out = subprocess.run([bible_program, "-p", data_dir, "-f", reference], check=True,
                         capture_output=True, text=True).stdout
    chapters, last = [], None
    for line in out.splitlines():
        m = re.match(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        chapter = (m.group(1), m.group(2))
        if chapter != last:
            chapters.append([])
            last = chapter
        chapters[-1].append(m.group(4).strip())
    if not chapters:
        raise SystemExit(f"{bible_program} printed no verses for {reference}")
    return "\n\n".join("\n".join(c) for c in chapters) + "\n"


def main(argv):
    usage = ("usage: texts.py austen RDX RDB NOVEL OUT | debian-reference TXT_GZ OUT | "
             "kjv BIBLE_PROGRAM DATA_DIR REFERENCE OUT")
    if len(argv) < 3:
        raise SystemExit(usage)
    kind, args, out = argv[0], argv[1:-1], argv[-1]
    if kind == "austen" and len(args) == 3:
        text = austen(*args)
    elif kind == "debian-reference" and len(args) == 1:
        text = debian_reference(*args)
    elif kind == "kjv" and len(args) == 3:
        text = kjv(*args)
    else:
        raise SystemExit(usage)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"{out}: {len(text)} characters")


if __name__ == "__main__":
    main(sys.argv[1:])
