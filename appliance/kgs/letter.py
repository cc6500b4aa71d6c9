"""PIN letters: one A4 PDF per card in a sealed-mailer layout (address window, the PIN under a tear-off strip)."""

# A hand-written PDF 1.4 (as appliance/console/pdf.py): a mailer is a few positioned strings and lines,
# which needs no PDF library in the process that holds card PINs (fpdf2 would bring Pillow and fontTools).

from __future__ import annotations

import time

_W, _H = 595, 842  # A4 in points
_MM = 72 / 25.4


def _esc(s: str) -> bytes:
    b = s.encode("latin-1", "replace")
    b = bytes(c if 32 <= c < 127 or c >= 160 else 63 for c in b)
    return b.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _text(x_mm: float, y_mm: float, size: float, s: str, font: str = "F1") -> bytes:
    """A string at (x, y) in millimetres from the top-left corner."""
    return b"BT /%s %.1f Tf %.2f %.2f Td (%s) Tj ET\n" % (font.encode(), size, x_mm * _MM, _H - y_mm * _MM, _esc(s))


def _line(x1: float, y1: float, x2: float, y2: float, dashed: bool = False) -> bytes:
    dash = b"[4 3] 0 d" if dashed else b"[] 0 d"
    return b"%s %.2f %.2f m %.2f %.2f l S\n" % (dash, x1 * _MM, _H - y1 * _MM, x2 * _MM, _H - y2 * _MM)


def _rect(x: float, y: float, w: float, h: float) -> bytes:
    return b"[] 0 d %.2f %.2f %.2f %.2f re S\n" % (x * _MM, _H - (y + h) * _MM, w * _MM, h * _MM)


def pin_letter(*, sender: str, name: str, address: tuple[str, ...], card_label: str, token_serial: str,
               pin: str, reprint: bool = False, now: float | None = None) -> bytes:
    """The letter as PDF bytes. The window (DIN 5008 form B: 20 mm from the left, 45 mm from the top,
    85 x 45 mm) shows the address; the PIN sits below the perforation, on the strip torn off and kept."""
    date = time.strftime("%Y-%m-%d", time.gmtime(now if now is not None else time.time()))
    ops = [b"0.5 w\n"]
    ops.append(_text(20, 20, 8, sender))
    ops.append(_rect(20, 45, 85, 45))  # the window
    y = 58.0
    for ln in (name, *address)[:7]:
        ops.append(_text(25, y, 11, ln[:60]))
        y += 5.5
    ops.append(_text(130, 100, 10, date))
    ops.append(_text(20, 110, 13, "Your smart card" + (" - new PIN" if reprint else ""), "F2"))
    body = [
        f"Card {card_label} (serial {token_serial}) has been personalised for {name}."[:100],
        "Your personal identification number (PIN) is printed on the strip below the perforation.",
        "Tear the strip off, keep it apart from the card, and never give the PIN to anyone.",
        "After too many wrong PINs the card locks; your card office can unlock it and send a new PIN.",
        "Sign and return the acknowledgement slip when you have received the card and this letter.",
    ]
    y = 122.0
    for ln in body:
        ops.append(_text(20, y, 10, ln))
        y += 6
    ops.append(_text(20, 200, 10, "Acknowledgement: I received card " + card_label[:32] + "   Signature: ________________"))
    ops.append(_line(10, 230, 200, 230, dashed=True))  # the perforation
    ops.append(_text(20, 228, 7, "- - - tear off here - - - keep this strip separate from your card - - -"))
    ops.append(_rect(20, 240, 90, 30))  # the sealed area
    ops.append(_text(25, 250, 9, "Card " + card_label[:32]))
    ops.append(_text(25, 262, 16, "PIN: " + pin, "F3"))
    content = b"".join(ops)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R /Resources << /Font << /F1 5 0 R /F2 6 0 R /F3 7 0 R >> >> >>" % (_W, _H),
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier-Bold /Encoding /WinAnsiEncoding >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body_obj in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body_obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)
