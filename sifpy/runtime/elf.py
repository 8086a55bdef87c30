"""Just enough ELF for MPI bind mode: a library's dynamic section (an ``ldd`` of our own,
which spares every rank the processes ``ldd`` or ``readelf`` would cost) and the strings a
library's exported data points to (Open MPI's compiled-in install directories).

Only 64-bit little-endian files are read: the only kind of host this runs on.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import rootpath

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 1, 5, 14, 15, 29
_SHT_RELA, _SHT_DYNSYM = 4, 11
# R_X86_64_RELATIVE, R_AARCH64_RELATIVE: a pointer to the library's own data.
_RELATIVE = {8, 1027}


class Dynamic(NamedTuple):
    soname: str | None
    needed: list[str]
    interp: str | None
    runpath: list[str]  # DT_RUNPATH (or DT_RPATH), $ORIGIN expanded


class _File:
    """An open ELF file: its program headers, read once."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RuntimeSetupError(f"can't bind MPI: {path}: {exc.strerror}") from exc
        head = os.pread(self.fd, 64, 0)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            os.close(self.fd)
            raise RuntimeSetupError(f"can't bind MPI: {path}: not a 64-bit ELF library")
        self.head = head
        phoff = struct.unpack_from("<Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        table = os.pread(self.fd, phentsize * phnum, phoff)
        self.phdrs = [struct.unpack_from("<IIQQQQQQ", table, i * phentsize) for i in range(phnum)]
        self.loads = [(va, size, off) for t, _, off, va, _, size, _, _ in self.phdrs if t == 1]

    def close(self) -> None:
        os.close(self.fd)

    def offset(self, vaddr: int) -> int | None:
        """The file offset of a virtual address, through the PT_LOAD segments."""
        return next(
            (off + vaddr - va for va, size, off in self.loads if va <= vaddr < va + size), None
        )

    def string(self, at: int) -> str:
        chunk = os.pread(self.fd, 4096, at)
        return chunk.split(b"\0", 1)[0].decode(errors="surrogateescape")


def dynamic(path: str) -> Dynamic:
    """The dynamic section of a 64-bit little-endian ELF file (RuntimeSetupError for
    anything else)."""
    f = _File(path)
    try:
        dyn, interp = None, None
        for p_type, _, off, _, _, filesz, _, _ in f.phdrs:
            if p_type == _PT_DYNAMIC:
                dyn = (off, filesz)
            elif p_type == _PT_INTERP:
                interp = os.pread(f.fd, filesz, off).rstrip(b"\0").decode()
        if dyn is None:
            return Dynamic(None, [], interp, [])
        raw = os.pread(f.fd, dyn[1], dyn[0])
        entries = [struct.unpack_from("<qQ", raw, at) for at in range(0, len(raw) - 15, 16)]
        strtab = next((v for t, v in entries if t == _DT_STRTAB), None)
        base = f.offset(strtab) if strtab is not None else None
        if base is None:
            raise RuntimeSetupError(f"can't bind MPI: {path}: no string table")
        soname = next((f.string(base + v) for t, v in entries if t == _DT_SONAME), None)
        needed = [f.string(base + v) for t, v in entries if t == _DT_NEEDED]
        # The loader ignores DT_RPATH when DT_RUNPATH is there.
        tag = _DT_RUNPATH if any(t == _DT_RUNPATH for t, _ in entries) else _DT_RPATH
        origin = os.path.dirname(path)
        runpath = [
            d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
            for t, v in entries
            if t == tag
            for d in f.string(base + v).split(":")
            if d
        ]
        return Dynamic(soname, needed, interp, runpath)
    finally:
        f.close()


def elf_info(path: str) -> tuple[str | None, list[str], str | None]:
    """(DT_SONAME, DT_NEEDED list, PT_INTERP) of a library or program."""
    d = dynamic(path)
    return d.soname, d.needed, d.interp


def pointed_strings(path: str, symbol: str, count: int) -> list[str | None] | None:
    """The strings the last ``count`` pointers of the exported data object ``symbol`` point
    to (None for a null pointer), or None when the library exports no such object. In a
    shared library each such pointer is a relative relocation whose addend is the string's
    address; the word in the file is read where there is none."""
    f = _File(path)
    try:
        shoff = struct.unpack_from("<Q", f.head, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", f.head, 0x3A)
        raw = os.pread(f.fd, shentsize * shnum, shoff)
        sections = [struct.unpack_from("<IIQQQQIIQQ", raw, i * shentsize) for i in range(shnum)]
        found = None
        for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
            if sh_type != _SHT_DYNSYM or not entsize or link >= len(sections):
                continue
            strtab_off = sections[link][4]
            table = os.pread(f.fd, size, off)
            for at in range(0, len(table) - entsize + 1, entsize):
                st_name, _, _, _, value, st_size = struct.unpack_from("<IBBHQQ", table, at)
                if st_size >= 8 * count and f.string(strtab_off + st_name) == symbol:
                    found = (value + st_size - 8 * count, value + st_size)
                    break
        if found is None:
            return None
        relocs: dict[int, int] = {}
        for _, sh_type, _, _, off, size, _, _, _, entsize in sections:
            if sh_type != _SHT_RELA or entsize != 24:
                continue
            table = os.pread(f.fd, size, off)
            for at in range(0, len(table) - 23, 24):
                r_offset, r_info, r_addend = struct.unpack_from("<QQq", table, at)
                if found[0] <= r_offset < found[1] and r_info & 0xFFFFFFFF in _RELATIVE:
                    relocs[r_offset] = r_addend
        out: list[str | None] = []
        for where in range(found[0], found[1], 8):
            target = relocs.get(where)
            if target is None:
                word_at = f.offset(where)
                word = os.pread(f.fd, 8, word_at) if word_at is not None else b""
                target = struct.unpack("<Q", word)[0] if len(word) == 8 else 0
            text_at = f.offset(target) if target else None
            out.append(f.string(text_at) if text_at is not None else None)
        return out
    finally:
        f.close()


def kind_in_root(root_fd: int, path: str) -> tuple[int, int] | None:
    """(ELF class, machine) of ``path`` inside the root ``root_fd``, or None."""
    fd = rootpath.open_in_root(root_fd, path)
    if fd is None:
        return None
    try:
        head = os.pread(fd, 20, 0)
    finally:
        os.close(fd)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4], struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]
