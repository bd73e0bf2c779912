"""MetaImage (``.mha``/``.mhd``) data-length check before ITK reads the voxels.

ITK's MetaImage reader, given a file cut short, prints its own lines on stderr and then fails with the
operating system's last error ("No such file or directory" for a file that exists). This reads the text
header instead, as MetaIO does (``Key = Value`` lines up to ``ElementDataFile``, which comes last), and
says in one line what is missing. Layouts it does not size (compressed or ASCII data, a list or pattern
of slice files) are left to ITK.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import InputImageError, truncated_error

#: MetaIO's element types and their sizes in bytes (metaTypes.h; MET_LONG is 4 bytes there).
_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                  "MET_DOUBLE": 8}
#: A header longer than this is not a MetaImage header.
_MAX_HEADER = 1 << 16


def read_header(path: Path) -> tuple[dict[str, str], int]:
    """The header's fields (keys as written) and the byte where the header ends (after ``ElementDataFile``'s
    line); raises when there is no ``ElementDataFile`` line."""
    with open(path, "rb") as fh:
        head = fh.read(_MAX_HEADER)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        line_end = len(head) if end < 0 else end + 1
        key, sep, value = head[pos:line_end].decode("latin-1").partition("=")
        pos = line_end
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, pos
    raise InputImageError(f"{path}: cannot read image: unknown format or corrupt file (no MetaImage header: "
                          "it has no ElementDataFile line)")


def check_metaimage(path: Path) -> None:
    """Raise when the voxel data the header promises are not all there (a missing or short data file)."""
    fields, header_end = read_header(path)
    if fields.get("CompressedData", "False").lower() == "true" or fields.get("BinaryData", "True").lower() != "true":
        return
    element = _ELEMENT_BYTES.get(fields.get("ElementType", ""))
    try:
        dims = [int(d) for d in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        skip = int(fields.get("HeaderSize", "0"))
    except ValueError:
        return  # ITK says what is wrong with such a header
    data = fields["ElementDataFile"]
    if element is None or not dims or skip < 0 or data.startswith("LIST") or "%" in data or " " in data:
        return
    nbytes = math.prod(dims) * channels * element
    if data == "LOCAL":
        got = path.stat().st_size - header_end - skip
    else:
        data_path = path.parent / data
        if not data_path.is_file():
            raise InputImageError(f"{path}: cannot read image: its data file {data_path} does not exist")
        got = data_path.stat().st_size - skip
    if got < nbytes:
        raise truncated_error(path, got, nbytes)
