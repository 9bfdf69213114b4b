"""Read which GPU architectures a shared object really holds machine code (cubins) for.

nvcc embeds device code in an ELF section ``.nv_fatbin``: a sequence of fat binaries (magic
0xBA55ED50), each a list of entries of kind 1 (PTX) or 2 (ELF cubin) tagged with an SM number.
Reading it lets ``fastcon.backends()`` report what was built, not what the build meant to do.
"""

from __future__ import annotations

import struct

_FATBIN_MAGIC = 0xBA55ED50
_KIND_CUBIN = 2


def _sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return {}
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx][4]
    out = {}
    for name, _typ, _flags, _addr, off, size in heads:
        end = data.index(b"\0", strtab + name)
        out[data[strtab + name : end].decode(errors="replace")] = data[off : off + size]
    return out


def cubin_archs(path: str) -> list[str]:
    """Sorted ``sm_XX`` tags of the cubins embedded in the shared object at ``path``."""
    with open(path, "rb") as f:
        sec = _sections(f.read()).get(".nv_fatbin", b"")
    archs, pos = set(), 0
    while pos + 16 <= len(sec):
        magic, _ver, header, size = struct.unpack_from("<IHHQ", sec, pos)
        if magic != _FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned inside the section
            continue
        p, end = pos + header, pos + header + size
        while p + 32 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", sec, p)
            arch = struct.unpack_from("<I", sec, p + 28)[0]
            if kind == _KIND_CUBIN:
                archs.add(arch)
            p += entry_header + entry_size
        pos = end
    return [f"sm_{a}" for a in sorted(archs)]
