"""The run page's HTML pieces: escaped text, sections, tables, collapsible lists, inline
figures, and the page's inline style (no script, nothing fetched)."""

from __future__ import annotations

import html
from typing import Any

from tasks.results.report import data_uri

MAX_NAMES = 2000  # names listed in a collapsible table; the store holds every one


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def number(value) -> str:
    return "?" if value is None else f"{float(value):.1f}"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def key_values(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows.items())
    return f'<table class="kv">{cells}</table>'


def table(
    header: list[str],
    rows: list[list[str]],
    *,
    classes: list[str] | None = None,
    marked: list[bool] | None = None,
) -> str:
    classes = classes or [""] * len(header)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        mark = ' class="mark"' if marked and marked[i] else ""
        cells = "".join(
            f'<td class="{cls}">{escape(value)}</td>' if cls else f"<td>{escape(value)}</td>"
            for value, cls in zip(row, classes, strict=True)
        )
        body.append(f"<tr{mark}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def details(summary: str, content: str, total: int) -> str:
    more = f" (the first {MAX_NAMES:,} listed)" if total > MAX_NAMES else ""
    return f"<details><summary>{escape(summary)}{more}</summary>{content}</details>"


def figure(png: bytes, alt: str) -> str:
    return f'<figure><img src="{data_uri(png)}" alt="{escape(alt)}"></figure>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1080px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { margin-top: 1.4em; }
nav a { margin: 0 .3em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left;
         vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { background: #f6f6f6; font-weight: 600; }
thead th { background: #f0f0f0; }
tr.mark td { background: #fff6d6; font-weight: 600; }
figure { margin: .6em 0; } img { max-width: 100%; height: auto; }
details { margin: .4em 0; } summary { cursor: pointer; color: #1f5fa8; }
"""
