"""A minimal PDF 1.4 writer for printable text: Courier on A4, a fixed number of lines per page."""

from __future__ import annotations

LINES_PER_PAGE = 64
COLUMNS = 92  # Courier 9 pt on A4 with 40 pt margins
_W, _H, _MARGIN, _SIZE, _LEAD = 595, 842, 40, 9, 11.5


def _esc(line: str) -> bytes:
    # Latin-1 is what the standard Courier font encodes; anything else shows as '?'.
    b = line.encode("latin-1", "replace")
    b = bytes(c if 32 <= c < 127 or c >= 160 else 63 for c in b)
    return b.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _fold(lines: list[str]) -> list[str]:
    out = []
    for ln in lines:
        ln = ln.expandtabs(4)
        while len(ln) > COLUMNS:
            out.append(ln[:COLUMNS])
            ln = "  " + ln[COLUMNS:]
        out.append(ln)
    return out


def text_pdf(lines: list[str], title: str = "") -> bytes:
    lines = _fold(lines) or [""]
    pages = [lines[i:i + LINES_PER_PAGE] for i in range(0, len(lines), LINES_PER_PAGE)]
    objs: list[bytes] = []  # object n is objs[n-1]
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(b"")  # pages tree, filled in once the page objects are numbered
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier /Encoding /WinAnsiEncoding >>")
    info = b"<< /Title (" + _esc(title) + b") /Producer (Donjon) >>"
    objs.append(info)
    kids = []
    for n, page in enumerate(pages, 1):
        body = [b"BT", f"/F1 {_SIZE} Tf {_LEAD} TL {_MARGIN} {_H - _MARGIN} Td".encode()]
        for ln in page:
            body.append(b"(" + _esc(ln) + b") '")
        body.append(b"ET")
        footer = f"page {n} of {len(pages)}"
        body += [b"BT", f"/F1 8 Tf {_W - _MARGIN - 6 * len(footer)} 20 Td".encode(), b"(" + _esc(footer) + b") Tj", b"ET"]
        stream = b"\n".join(body)
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objs)
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {_W} {_H}] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {content} 0 R >>".encode())
        kids.append(len(objs))
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>".encode()
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 4 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)
