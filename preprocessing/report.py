"""``<out>/index.html``: the cohort QC page a person opens in a browser.

One row per slide — QC thumbnail (the manifest's ``qc_png``: a link relative to the output folder, to
``qc/<slide_id>.png`` or wherever the output layout puts the QC picture), patch count, tissue area,
share of flat (one-colour) patches, µm/px and its source, status, error and warnings — under the cohort
totals, which count the slides whose patches are mostly flat. Self-contained: inline
CSS, no scripts, no web fonts, so it opens from a cluster share or a copied folder.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from sgcl.utils.atomic import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.totals{display:flex;flex-wrap:wrap;gap:.6em;margin:.8em 0 1.2em}
.totals div{background:#f3f4f6;border-radius:6px;padding:.45em .8em}
.totals b{font-size:1.15em;display:block}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{border-bottom:1px solid #e5e7eb;padding:.45em .55em;text-align:left;vertical-align:top}
th{background:#f9fafb;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:260px;max-height:200px;border:1px solid #ddd}
.done{color:#166534;font-weight:600}.failed{color:#b91c1c;font-weight:600}.skipped{color:#92400e;font-weight:600}
.err{color:#b91c1c;max-width:36em;word-break:break-word}.warn{color:#92400e;max-width:30em;word-break:break-word}
.path{color:#6b7280;font-size:.85em;word-break:break-all}
td.flat{color:#b91c1c;font-weight:600}
"""


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _num(value, fmt: str) -> str:
    return "" if _blank(value) else format(float(value), fmt)


def _percent(value) -> str:
    return "" if _blank(value) or math.isnan(float(value)) else f"{float(value):.0%}"


def _text(value) -> str:
    return "" if _blank(value) else html.escape(str(value))


def render_report(table: pd.DataFrame, out_dir: Path, title: str = "sgcl tile — cohort QC") -> str:
    """The HTML page for a merged manifest ``table`` whose relative links resolve from ``out_dir``."""
    from .cohort import MANIFEST_COLUMNS
    from .slide_tiler import FLAT_WARNING_PREFIX

    table = table.reindex(columns=list(dict.fromkeys([*MANIFEST_COLUMNS, *table.columns])))
    rows = table.to_dict("records")
    status = table["status"].value_counts().to_dict() if len(table) else {}
    n_patches = pd.to_numeric(table.get("n_patches"), errors="coerce").fillna(0) if len(table) else pd.Series([], dtype=float)
    ok = table["status"].isin(["done", "skipped"]) if len(table) else pd.Series([], dtype=bool)
    zero = int(((n_patches == 0) & ok & ~table["warning"].astype("string").fillna("").str.startswith("busy:")).sum()) if len(table) else 0
    area = pd.to_numeric(table.get("tissue_area_mm2"), errors="coerce").fillna(0)[ok].sum() if len(table) else 0.0
    mostly_flat = table["warning"].astype("string").fillna("").str.contains(FLAT_WARNING_PREFIX, regex=False)
    totals = [
        ("slides", len(table)), ("done", status.get("done", 0)), ("skipped", status.get("skipped", 0)),
        ("failed", status.get("failed", 0)), ("zero patches", zero), ("patches", int(n_patches[ok].sum()) if len(table) else 0),
        ("tissue mm²", f"{area:.1f}"), ("mostly flat", int(mostly_flat.sum())),
    ]
    head = "".join(f"<div>{html.escape(k)}<b>{v}</b></div>" for k, v in totals)
    body = []
    for r, flat in zip(rows, mostly_flat):
        qc = r.get("qc_png")
        thumb = ""
        if not _blank(qc) and (out_dir / str(qc)).exists():
            href = html.escape(str(qc), quote=True)
            thumb = f'<a href="{href}"><img src="{href}" alt="QC {_text(r["slide_id"])}" loading="lazy"></a>'
        mpp = _num(r.get("mpp"), ".4g")
        src = _text(r.get("mpp_source"))
        achieved = _num(r.get("achieved_mpp"), ".4g")
        st = _text(r.get("status"))
        body.append(
            "<tr>"
            f'<td>{thumb}</td>'
            f'<td><b>{_text(r["slide_id"])}</b><div class="path">{_text(r.get("path"))}</div></td>'
            f'<td class="{st}">{st}</td>'
            f'<td class="num">{_num(r.get("n_patches"), ".0f")}</td>'
            f'<td class="num">{_num(r.get("tissue_area_mm2"), ".2f")}</td>'
            f'<td class="num{" flat" if flat else ""}">{_percent(r.get("flat_fraction"))}</td>'
            f'<td class="num">{mpp}<div class="path">{src}</div></td>'
            f'<td class="num">{achieved}</td>'
            f'<td class="num">{_num(r.get("seconds"), ".1f")}</td>'
            f'<td class="err">{_text(r.get("error"))}</td>'
            f'<td class="warn">{_text(r.get("warning"))}</td>'
            "</tr>"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1><div class=\"path\">{html.escape(str(out_dir.resolve()))} · {stamp} · "
        "manifest: <a href=\"manifest.csv\">manifest.csv</a></div>\n"
        f"<div class=\"totals\">{head}</div>\n"
        "<table><thead><tr><th>QC</th><th>slide</th><th>status</th><th>patches</th><th>tissue mm²</th>"
        "<th title=\"kept patches that are one flat colour; empty: not checked (coordinates only)\">flat</th>"
        "<th>slide µm/px (source)</th><th>achieved µm/px</th><th>seconds</th><th>error</th><th>warnings</th>"
        "</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n</body></html>\n"
    )


def write_report(out_dir: str | Path, table: pd.DataFrame) -> Path:
    """Write ``<out_dir>/index.html`` atomically."""
    out_dir = Path(out_dir)
    path = out_dir / "index.html"
    atomic_write_text(path, render_report(table, out_dir))
    return path
