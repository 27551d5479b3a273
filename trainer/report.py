"""The evaluation report as one list of sections, rendered to Markdown and to HTML.

Blocks are plain data (text, table, image file name, preformatted text), so both renderings
say the same thing and the images stay beside the report as PNG files.
"""
from __future__ import annotations

import dataclasses
import html


@dataclasses.dataclass
class Text:
    text: str


@dataclasses.dataclass
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class Image:
    file: str
    alt: str


@dataclasses.dataclass
class Pre:
    text: str


@dataclasses.dataclass
class Section:
    title: str
    blocks: list


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                out += [block.text, ""]
            elif isinstance(block, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in block.head) + " |")
                out.append("|" + "---|" * len(block.head))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Image):
                out += [f"![{block.alt}]({block.file})", ""]
            elif isinstance(block, Pre):
                out += ["```", block.text.rstrip("\n"), "```", ""]
    return "\n".join(out)


STYLE = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
         "padding:0.2em 0.6em;text-align:right}td:first-child,th:first-child{text-align:left}"
         "pre{background:#f5f5f5;padding:0.6em;overflow:auto}img{max-width:100%}")


def to_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for section in sections:
        out.append(f"<h2>{e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Text):
                out.append(f"<p>{e(block.text)}</p>")
            elif isinstance(block, Table):
                out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in block.head)
                           + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                        for row in block.rows]
                out.append("</table>")
            elif isinstance(block, Image):
                out.append(f"<p><img src='{e(block.file)}' alt='{e(block.alt)}'></p>")
            elif isinstance(block, Pre):
                out.append(f"<pre>{e(block.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
