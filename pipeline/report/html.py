"""HTML assembly for the report: one self-contained page (inline CSS, PNGs as base64 data URIs).

No scripts, fonts or stylesheets are fetched: the file opens offline and can be mailed as it is.
Everything taken from run files is escaped.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.0em; } .muted { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; } th { background: #f4f4f4; }
td.text, th.text { text-align: left; } .figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; } .note { background: #fff8e1; padding: 0.4em 0.8em; border-left: 3px solid #f0b400; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; max-height: 40em; }
code { font-size: 0.9em; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    """A PNG as a data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, caption: str | None = None) -> str:
    """A figure with the PNG embedded and an optional caption."""
    text = f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">'
    if caption:
        text += f"<figcaption>{esc(caption)}</figcaption>"
    return text + "</figure>"


def figures(*items: str) -> str:
    """Figures side by side (wrapping on narrow windows)."""
    return '<div class="figs">' + "".join(items) + "</div>"


def paragraph(text: str, css: str | None = None) -> str:
    return f'<p class="{css}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


def note(text: str) -> str:
    """A highlighted remark (a plot left out and why, a warning about changed inputs)."""
    return paragraph(text, "note")


def _cell(value: Any, digits: int) -> tuple[str, bool]:
    """Formatted cell text and whether it is text (left-aligned) rather than a number."""
    if value is None:
        return "-", False
    if isinstance(value, bool):
        return str(value).lower(), True
    if isinstance(value, float):
        return ("-" if value != value else f"{value:.{digits}f}"), False
    if isinstance(value, int):
        return str(value), False
    return str(value), True


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """An HTML table; floats with `digits` decimals, None/NaN as '-', text left-aligned."""
    out = ["<table><tr>"]
    out += [f'<th class="text">{esc(h)}</th>' if i == 0 else f"<th>{esc(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        for value in row:
            text, is_text = _cell(value, digits)
            out.append(f'<td class="text">{esc(text)}</td>' if is_text else f"<td>{esc(text)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def pre_json(value: Any) -> str:
    """A value as indented JSON in a <pre> block."""
    return f"<pre>{esc(json.dumps(value, indent=2, sort_keys=False, default=str))}</pre>"


@dataclass
class Section:
    """One titled part of the page: HTML fragments in order."""

    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, *fragments: str) -> "Section":
        self.parts.extend(fragments)
        return self


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: title, a table of contents, then each non-empty section."""
    shown = [s for s in sections if s.parts]
    toc = " · ".join(f'<a href="#s{i}">{esc(s.title)}</a>' for i, s in enumerate(shown))
    body = "".join(f'<h2 id="s{i}">{esc(s.title)}</h2>' + "".join(s.parts) for i, s in enumerate(shown))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(subtitle)}</p><p>{toc}</p>{body}</body></html>\n"
    )
