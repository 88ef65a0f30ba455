"""Make Great Expectations Data Docs open offline: no CDN request, nothing blank.

GX 1.x pages load Bootstrap, bootstrap-table, Font Awesome, jQuery and vega from public
CDNs and a logo from S3. In a hospital network, an air-gapped CI runner or an archive
opened years later those requests fail: the page loses its layout and the console fills
with errors. This rewrites every page of a Data Docs site in place:

- the index page's tables (validation runs, expectation suites), which GX fills in the
  browser with bootstrap-table from data inlined in a script, are written out as static
  HTML tables first, with each row's link;
- every ``<script>`` is removed (external ones fail offline; inline ones only drive the
  CDN libraries: table filters, date pickers, vega charts). The tables themselves are
  rendered server-side by GX and stay complete;
- every ``<link>`` to an ``http(s)`` or protocol-relative URL is removed, and a small
  local stylesheet (inline, below) gives the pages a readable layout in their place;
- ``<img>`` from remote hosts are pointed at GX's own local copy in ``static/images``
  (the logo) or dropped, ``url(https://...)`` in inline styles becomes ``none``, and the
  favicon link (one folder too high on GX's result pages: a 404 even online) becomes an
  empty inline icon;
- a one-line banner says the copy is offline.

Links (``<a href="https://docs.greatexpectations.io/...">``) are kept: they are not
requests until clicked.
"""

from __future__ import annotations

import ast
import html as html_lib
import os
import re
from pathlib import Path

OFFLINE_MARK = "<!-- bonefrac: offline data docs -->"

_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script\s*>", re.IGNORECASE | re.DOTALL)
_REMOTE_LINK = re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE)
_REMOTE_IMG = re.compile(r"<img\b([^>]*?)\bsrc\s*=\s*([\"'])(?:https?:)?//[^\"']*\2([^>]*)>", re.IGNORECASE)
_ICON_LINK = re.compile(r"<link\b[^>]*\brel\s*=\s*[\"'][^\"']*icon[^\"']*[\"'][^>]*>", re.IGNORECASE)
_REMOTE_URL = re.compile(r"url\(\s*[\"']?(?:https?:)?//[^)]*\)", re.IGNORECASE)
_DEAD_BUTTON = re.compile(r"<button\b[^>]*clearTableFilters[^>]*>.*?</button\s*>", re.IGNORECASE | re.DOTALL)
_HEAD_END = re.compile(r"</head\s*>", re.IGNORECASE)
_BODY_START = re.compile(r"<body\b[^>]*>", re.IGNORECASE)

OFFLINE_CSS = """
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color:#1d2733;
  background:#f5f7fa; }
.container, .container-fluid { max-width:1280px; margin:0 auto; padding:12px 20px; }
.row { display:flex; flex-wrap:wrap; gap:16px; }
.col-md-2, .col-md-3, .col-lg-2, .col-lg-3 { flex:0 0 250px; }
.col, .col-md-9, .col-md-10, .col-lg-9, .col-lg-10, .col-12 { flex:1 1 600px; min-width:0; }
nav, .navbar { background:#fff; border-bottom:1px solid #dde3ea; padding:8px 20px; display:flex; gap:14px;
  align-items:center; flex-wrap:wrap; }
.card { background:#fff; border:1px solid #dde3ea; border-radius:8px; margin:0 0 14px; }
.card-header { padding:8px 14px; border-bottom:1px solid #dde3ea; background:#f0f3f7; font-weight:600; }
.card-body { padding:10px 14px; overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:13px; margin:4px 0 10px; }
th, td { border-bottom:1px solid #dde3ea; padding:5px 8px; text-align:left; vertical-align:top; }
thead th { background:#f0f3f7; }
.table-striped tbody tr:nth-child(odd) { background:#fafbfc; }
.badge, .badge-success, .badge-danger { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; }
.text-success, .badge-success { color:#1d5e3a; } .text-danger, .badge-danger { color:#b42318; }
.alert, .alert-danger, .alert-warning { padding:8px 12px; border-radius:6px; background:#fff7ed; }
.fas, .far, .fa { font-style:normal; }
.fa-check-circle::before { content:"\\2713 "; color:#1d5e3a; }
.fa-times::before, .fa-times-circle::before { content:"\\2717 "; color:#b42318; }
.collapse, .collapse:not(.show) { display:block; } /* no bootstrap JS offline: show everything */
.d-none, .sr-only { display:none; }
img { max-width:100%; height:auto; }
pre, code { white-space:pre-wrap; word-break:break-word; }
a { color:#1f4e79; }
.bonefrac-offline { background:#eef4fa; border-bottom:1px solid #cfe0f1; padding:6px 20px; font-size:12px;
  color:#33404d; }
"""


_BOOTSTRAP_TABLE = re.compile(
    r"\$\(['\"]#(?P<id>[\w-]+)['\"]\)\.bootstrapTable\(.*?^\s*columns:\s*(?P<columns>\[.*?\]),?\s*$"
    r".*?^\s*data:\s*(?P<data>\[.*?\]),?\s*$",
    re.DOTALL | re.MULTILINE,
)


def _static_tables(page: str) -> str:
    """Fill each empty ``<table id=...>`` that a bootstrap-table script would fill, from the script's data."""
    for m in _BOOTSTRAP_TABLE.finditer(page):
        try:
            columns = ast.literal_eval(m.group("columns"))
            rows = ast.literal_eval(m.group("data"))
        except (ValueError, SyntaxError):
            continue
        cols = [c for c in columns if isinstance(c, dict) and c.get("title") and c.get("visible") != "false"]
        head = "".join(f"<th>{html_lib.escape(str(c['title']))}</th>" for c in cols)
        body = []
        for row in rows:
            link = row.get("_table_row_link_path")
            cells = []
            for i, c in enumerate(cols):
                cell = str(row.get(c["field"], ""))  # GX's own rendered HTML for the cell
                if i == 0 and link:
                    cell = f'<a href="{html_lib.escape(str(link))}">{cell or "open"}</a>'
                cells.append(f"<td>{cell}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        table = f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
        tid = re.escape(m.group("id"))
        page = re.sub(
            rf"(<table\b[^>]*\bid\s*=\s*[\"']{tid}[\"'][^>]*>)(.*?)(</table\s*>)",
            lambda t, table=table: t.group(1) + table + t.group(3),
            page,
            count=1,
            flags=re.DOTALL | re.IGNORECASE,
        )
    return page


def _rel_static(page: Path, root: Path) -> str:
    return os.path.relpath(root / "static", page.parent).replace(os.sep, "/")


def offline_html(html: str, static_prefix: str = "static") -> str:
    """One Data Docs page → the same page without any network request."""
    if OFFLINE_MARK in html:
        return html
    out = _SCRIPT.sub("", _static_tables(html))
    out = _DEAD_BUTTON.sub("", out)  # "Clear Filters" drives bootstrap-table: nothing to clear offline
    out = _REMOTE_LINK.sub("", out)
    # GX links the favicon one folder too high on result pages (a 404 even online): inline an empty one.
    out = _ICON_LINK.sub('<link rel="icon" href="data:,">', out)
    out = _REMOTE_URL.sub("none", out)  # background images from S3 in inline styles
    logo = f"{static_prefix}/images/logo-long.png"

    def img(m: re.Match[str]) -> str:
        attrs = m.group(1) + m.group(3)
        return f'<img{attrs} src="{logo}">' if "logo" in m.group(0).lower() else ""

    out = _REMOTE_IMG.sub(img, out)
    style = f"{OFFLINE_MARK}\n<style>{OFFLINE_CSS}</style>\n"
    out = _HEAD_END.sub(lambda _m: style + "</head>", out, count=1) if _HEAD_END.search(out) else style + out
    banner = (
        '<div class="bonefrac-offline">Offline copy of the Great Expectations Data Docs: '
        "styles are local and scripts are removed (no table filters or charts); every result table is complete.</div>"
    )
    out = _BODY_START.sub(lambda m: m.group(0) + banner, out, count=1)
    return out


def make_offline(docs_dir: str | Path) -> list[Path]:
    """Rewrite every ``*.html`` under ``docs_dir`` in place; returns the pages rewritten."""
    root = Path(docs_dir)
    done = []
    for page in sorted(root.rglob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        new = offline_html(text, _rel_static(page, root))
        if new != text:
            page.write_text(new, encoding="utf-8")
            done.append(page)
    return done
