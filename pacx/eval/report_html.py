"""HTML building blocks of the results report (:mod:`pacx.eval.report`): escaping, a "not available" line,
PNG figures inlined as base64 ``data:`` URIs, and the Markdown subset ``comparison.md`` uses.

No JavaScript and no external reference: the page stays one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence

from PIL import Image

FIGURE_DPI = 100


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def unavailable(what: str) -> str:
    return f'<p class="unavailable">not available: {esc(what)}</p>'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_html(png: bytes, caption: str, alt: str, min_width: int = 0) -> str:
    """A ``<figure>`` with the PNG inline. A plot saved at more than :data:`FIGURE_DPI` is shown at that
    resolution's size (its text as large as in the report's own plots); images narrower than ``min_width``
    px are enlarged (whole multiples, pixelated), so small reconstruction grids stay legible."""
    with Image.open(io.BytesIO(png)) as img:
        width, dpi = img.width, float(img.info.get("dpi", (FIGURE_DPI,))[0])
    scale = max(1, min(4, min_width // max(width, 1)))
    if scale > 1:
        size = f' width="{width * scale}" class="pixelated"'
    else:
        size = f' width="{round(width * FIGURE_DPI / dpi)}"' if dpi > 1.1 * FIGURE_DPI else ""
    return (f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}"{size}>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def _inline_markdown(text: str) -> str:
    text = esc(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\*(.+?)\*", r"<em>\1</em>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _markdown_table(lines: Sequence[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    align: list[str] = []
    if len(rows) > 1 and all(re.fullmatch(r":?-+:?", c) for c in rows[1]):
        align = ["num" if c.endswith(":") and not c.startswith(":") else "" for c in rows[1]]
        rows = [rows[0], *rows[2:]]
    head = "".join(f"<th>{_inline_markdown(c)}</th>" for c in rows[0])
    body = []
    for row in rows[1:]:
        cells = (f'<td class="{align[i]}">' if i < len(align) and align[i] else "<td>"
                 for i in range(len(row)))
        body.append("<tr>" + "".join(f"{td}{_inline_markdown(c)}</td>" for td, c in zip(cells, row))
                    + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def markdown_html(text: str) -> str:
    """The Markdown subset ``comparison.md`` uses (``#`` headings, paragraphs, pipe tables, ``*em*``,
    ``**strong**``, `` `code` ``) as HTML; headings shift two levels down (``#`` -> ``<h3>``)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)
            out.append(f"<h{level}>{_inline_markdown(line.lstrip('#').strip())}</h{level}>")
            i += 1
        else:
            start = i
            table = line.startswith("|")
            while i < len(lines) and lines[i].strip() and lines[i].strip().startswith("|") == table \
                    and not lines[i].strip().startswith("#"):
                i += 1
            block = [ln.strip() for ln in lines[start:i]]
            out.append(_markdown_table(block) if table else f"<p>{_inline_markdown(' '.join(block))}</p>")
    return "\n".join(out)
