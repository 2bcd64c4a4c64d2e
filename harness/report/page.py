"""``leaderboard.html``: one self-contained page (inline CSS and script, figures inlined as PNG).

Every table sorts by any column: a header is a button, and each cell carries
its raw value in ``data-value`` (numbers in full precision, ``Infinity`` for
an unbounded radius, empty for unknown, which sorts last either way).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure

from ..vocabulary import Certifier
from .leaderboard import KNOWN_EXACTLY_TOLERANCE, LeaderboardTable, radius_label

__all__ = ["AttackNote", "FigureEntry", "figure_png", "render_page"]


@dataclass(frozen=True)
class FigureEntry:
    """A figure of the page: file stem, caption and PNG bytes."""

    name: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class AttackNote:
    """What an attack does and how it keeps pixels in [0, 1] (None: not recorded, as in version-1 stores)."""

    summary: str | None
    box_handling: str | None


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


_STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dde5; --head: #f1f3f7; --accent: #2f5fb3; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); margin: 0; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 6px; }
.meta, .lede, dl.threat, figcaption { color: var(--muted); }
.lede { max-width: 980px; }
nav a { margin-right: 14px; color: var(--accent); }
dl.threat { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 6px 0 10px; }
dl.threat dt { font-weight: 600; color: var(--ink); }
dl.threat dd { margin: 0; }
ul.attacks { margin: 0; padding-left: 18px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 8px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 6px; text-align: right; vertical-align: top; white-space: nowrap; }
th { background: var(--head); position: sticky; top: 0; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th button:focus-visible { outline: 2px solid var(--accent); }
th[aria-sort="ascending"] .arrow::after { content: " \\25B2"; }
th[aria-sort="descending"] .arrow::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
td.wrap { white-space: normal; min-width: 110px; max-width: 170px; }
td.long { max-width: 150px; overflow: hidden; text-overflow: ellipsis; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef3fb; }
.unknown { color: var(--muted); }
.flag { display: inline-block; border-radius: 3px; padding: 0 5px; margin-left: 3px; font-size: 12px; background: #fde8c8; color: #7a4300; }
.flag.ok { background: #dff3e3; color: #1e6b34; }
.alarm { border: 2px solid #b3261e; background: #fde2e1; color: #7a1010; padding: 10px 14px; margin: 18px 0; }
.alarm ul { margin: 6px 0 0; padding-left: 18px; font-weight: normal; }
figure { margin: 24px 0; }
figure img { max-width: 100%; border: 1px solid var(--line); }
"""

_SCRIPT = """
(function () {
  function compare(a, b, numeric) {
    if (a === '' || b === '') { return a === b ? 0 : (a === '' ? 1 : -1); }
    return numeric ? Number(a) - Number(b) : a.localeCompare(b);
  }
  function sortTable(table, column, header) {
    var ascending = header.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('thead th').forEach(function (th) { th.removeAttribute('aria-sort'); });
    header.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var value = function (row) { return row.cells[column].getAttribute('data-value'); };
    var numeric = rows.every(function (row) { var v = value(row); return v === '' || !isNaN(Number(v)); });
    rows.sort(function (a, b) {
      var order = compare(value(a), value(b), numeric);
      if (value(a) === '' || value(b) === '') { return order; }
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('thead th').forEach(function (header, column) {
      header.querySelector('button').addEventListener('click', function () { sortTable(table, column, header); });
    });
  });
})();
"""


@dataclass(frozen=True)
class _Column:
    title: str
    tooltip: str = ""
    text: bool = False


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _cell(shown: str, value: str, *, css: str = "", title: str = "") -> str:
    classes = f' class="{css}"' if css else ""
    tooltip = f' title="{html.escape(title)}"' if title else ""
    return f'<td{classes}{tooltip} data-value="{html.escape(value)}">{shown}</td>'


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="unknown">–</span>'
    return f"{100 * value:.1f}%"


def _table(table_id: str, columns: list[_Column], rows: list[list[str]]) -> str:
    headers = []
    for column in columns:
        attributes = ' class="text"' if column.text else ""
        if column.tooltip:
            attributes += f' title="{html.escape(column.tooltip)}"'
        headers.append(f'<th scope="col"{attributes}><button type="button">{html.escape(column.title)}</button>'
                       '<span class="arrow" aria-hidden="true"></span></th>')
    head = "".join(headers)
    body = "\n".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return (
        f'<div class="scroll"><table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


_KNOWN_EXACTLY_HELP = (
    f"share of the examples both certified and attacked whose minimal adversarial radius is bracketed: certified radius "
    f">= verified radius / {1 + KNOWN_EXACTLY_TOLERANCE:g} (tolerance {100 * KNOWN_EXACTLY_TOLERANCE:g}%)"
)


def _robust_cell(row: dict, radius: float) -> str:
    """Attacked robust accuracy at ``radius``, or ``[certified, attacked]`` for a row with certificates (sorted by the attacked)."""
    attacked = row[radius]
    unknown = "" if not math.isnan(attacked) else f"not searched up to {radius:g} for every example"
    if row["certified"] is None:
        return _cell(_percent(attacked), _number(attacked), title=unknown)
    certified = row["certified"][radius]
    title = (
        f"certified (lower bound): {100 * certified:.1f}% of {row['certified_examples']} certified examples; attacked "
        f"(upper bound): {'unknown, ' + unknown if unknown else f'{100 * attacked:.1f}%'}"
    )
    attacked_shown = "–" if math.isnan(attacked) else f"{100 * attacked:.1f}"
    return _cell(f"[{100 * certified:.1f}, {attacked_shown}]", _number(attacked), title=title)


def _leaderboard_section(table: LeaderboardTable, notes: dict[str, AttackNote]) -> str:
    group = table.group
    robust_help = "verified robust accuracy at eps = {r:g}" + (
        "; [certified, attacked] where the model has certificates: certified lower bound, attacked upper bound" if table.certified else ""
    )
    radii_columns = [_Column(f"robust @ {_radius(r)}", robust_help.format(r=r)) for r in table.radii]
    certified_columns = [_Column("known exactly", _KNOWN_EXACTLY_HELP)] if table.certified else []
    columns = [
        _Column("rank", "1 = most robust; ties share a rank"),
        _Column("model", text=True),
        _Column("training", "threat model the model was trained against (hover a cell for the recipe)", text=True),
        _Column("source paper", text=True),
        _Column("clean", "accuracy on the full clean test split"),
        _Column("evaluation", "what the row's numbers come from: an evaluation suite and its version, or the worst case over single attacks", text=True),
        *radii_columns,
        _Column("median radius", "median over examples of the smallest verified adversarial distance (0 if misclassified clean)"),
        *certified_columns,
        _Column("examples", "test examples attacked"),
        _Column("verified", "claimed successes that passed exact verification"),
        _Column(
            "best attack",
            "single attacks: the one with the smallest median verified radius of its own; a suite: the member that found most minimal radii",
            text=True,
        ),
        _Column("s / example", "attack and verification seconds per example, all attacks"),
        _Column("reliability", "warnings about this row's numbers (hover a flag)", text=True),
    ]
    rows = []
    for row in table.rows.to_dict("records"):
        median = row["median_radius"]
        median_shown = f"&gt; {table.largest_radius:.3g}" if math.isinf(median) else f"{median:.3f}"
        verified = f"{row['verified']}/{row['claimed']}"
        flags = "".join(f'<span class="flag" title="{html.escape(tip)}">{html.escape(name)}</span>' for name, tip in row["flags"])
        cells = [
            _cell(str(row["rank"]), str(row["rank"])),
            _cell(html.escape(row["model"]), row["model"], css="text"),
            _cell(html.escape(row["trained_for"] or "–"), row["trained_for"] or "", css="text wrap", title=row["training"] or ""),
            _cell(html.escape(_short(row["paper"])), row["paper"] or "", css="text long", title=row["paper"] or ""),
            _cell(_percent(row["clean_accuracy"]), _number(row["clean_accuracy"])),
            _cell(html.escape(row["evaluation"]), row["evaluation"], css="text"),
            *[_robust_cell(row, r) for r in table.radii],
            _cell(median_shown, _number(median)),
            *([_cell(_percent(row["known_exactly"]), _number(row["known_exactly"]))] if table.certified else []),
            _cell(str(row["examples"]), str(row["examples"])),
            _cell(verified, _number(row["fraction_verified"]), title="claimed successes that passed exact verification"),
            _cell(html.escape(row["best_attack"]), row["best_attack"], css="text wrap"),
            _cell(f"{row['seconds_per_example']:.3f}", _number(row["seconds_per_example"])),
            _cell(flags or '<span class="flag ok">ok</span>', str(len(row["flags"])), css="text"),
        ]
        rows.append(cells)
    items = []
    for family, lambdas in table.attacks.items():
        note = notes.get(family, AttackNote(None, None))
        lambda_text = f", λ ∈ {{{', '.join(f'{lam:g}' for lam in lambdas)}}}" if lambdas else ""
        items.append(
            f"<li><b>{html.escape(family)}</b>{html.escape(lambda_text)}"
            + (f": {html.escape(note.summary)}" if note.summary else "")
            + f". Box: {html.escape(note.box_handling or 'not recorded')}.</li>"
        )
    attacks = f'<ul class="attacks">{"".join(items)}</ul>'
    ranked = (
        f"median verified radius, then robust accuracy at eps = {_radius(table.reference_radius)}"
        if table.reference_radius is not None else "median verified radius"
    )
    remarks = "".join(f'<p class="lede">{html.escape(n)}</p>' for n in table.notes)
    return (
        f'<section id="{group.slug}"><h2>{html.escape(group.title)}</h2>'
        f'<dl class="threat"><dt>Ball</dt><dd>{html.escape(_ball(table))}</dd>'
        f"<dt>Attacks</dt><dd>{attacks}</dd>"
        f"<dt>Schedules</dt><dd>{html.escape('; '.join(table.schedules))}</dd>"
        "<dt>Counted</dt><dd>a success only when the exact check passes: pixels in [0, 1], mass conserved, "
        "distance within the radius</dd>"
        f"<dt>Ranked by</dt><dd>{ranked}</dd></dl>{remarks}"
        f"{_table('leaderboard-' + group.slug, columns, rows)}</section>"
    )


def _radius(value: float) -> str:
    text = radius_label(value)
    return text if any(mark in text for mark in "./e") else text + ".0"


def _ball(table: LeaderboardTable) -> str:
    return table.group.ball_description or f"{table.group.ball_title or table.group.threat_model} (not described in the store)"


def _short(paper: str | None) -> str:
    if not paper:
        return "–"
    return paper if len(paper) <= 60 else paper[:57] + "..."


def _solver_section(solvers: pd.DataFrame) -> str:
    columns = [
        _Column("threat model", text=True),
        _Column("attack", text=True),
        _Column("model", text=True),
        _Column("at eps", "the radius of this threat model's ranking"),
        _Column("robust", "verified robust accuracy of this attack alone"),
        _Column("median radius", "median smallest verified distance"),
        _Column("verified", "claimed successes that passed exact verification"),
        _Column("s / example", "attack and verification seconds per example"),
        _Column("iterations / step", "solver iterations per attack step"),
        _Column("unconverged", "attack steps whose projection did not converge"),
        _Column("examples"),
    ]
    rows = []
    for row in solvers.to_dict("records"):
        median = row["median_radius"]
        rows.append([
            _cell(html.escape(row["threat"]), row["threat"], css="text"),
            _cell(html.escape(row["attack"]), row["attack"], css="text"),
            _cell(html.escape(row["model"]), row["model"], css="text"),
            _cell("–" if row["radius"] is None or math.isnan(row["radius"]) else f"{row['radius']:g}", _number(row["radius"])),
            _cell(_percent(row["robust_accuracy"]), _number(row["robust_accuracy"])),
            _cell("none found" if math.isinf(median) else f"{median:.3f}", _number(median)),
            _cell(f"{row['verified']}/{row['claimed']}", _number(row["fraction_verified"])),
            _cell(f"{row['seconds_per_example']:.3f}", _number(row["seconds_per_example"])),
            _cell("–" if math.isnan(row["iterations_per_step"]) else f"{row['iterations_per_step']:.1f}", _number(row["iterations_per_step"])),
            _cell(str(row["unconverged_steps"]), str(row["unconverged_steps"])),
            _cell(str(row["examples"]), str(row["examples"])),
        ])
    return (
        '<section id="solvers"><h2>Solvers</h2><p class="lede">Each attack on each model on its own: how far it gets, '
        "how many of its claims survive exact verification, and what it costs.</p>"
        f"{_table('solvers-table', columns, rows)}</section>"
    )


def _seconds(value: float) -> str:
    return _cell("–" if math.isnan(value) else f"{value:.3f}", _number(value))


def _certificates_section(certificates: pd.DataFrame) -> str:
    def certifier_name(certifier: Certifier) -> str:
        return certifier.value.replace("_", " ")

    columns = [
        _Column("threat model", text=True),
        _Column("model", text=True),
        _Column("radius", "a radius the certify cells report"),
        _Column("examples", "examples every certifier and the attacks ran on; every number of the row is over these"),
        *[_Column(f"certified ({certifier_name(c)})", f"share proven robust at this radius by {c.value}") for c in Certifier],
        _Column("attacked", "verified robust accuracy of the model's leaderboard row: share whose verified radius exceeds this one"),
        _Column("gap", "attacked minus certified (by any certifier): the share whose robustness at this radius neither side decides"),
        _Column("known exactly", _KNOWN_EXACTLY_HELP + "; the model's, over all radii"),
        *[_Column(f"s / example ({certifier_name(c)})", f"{c.value} seconds per example evaluated at this radius") for c in Certifier],
    ]
    rows = []
    for row in certificates.to_dict("records"):
        rows.append([
            _cell(html.escape(row["threat"]), row["threat"], css="text"),
            _cell(html.escape(row["model"]), row["model"], css="text"),
            _cell(f"{row['radius']:g}", _number(row["radius"])),
            _cell(str(row["examples"]), str(row["examples"])),
            *[_cell(_percent(row[f"certified_{c.value}"]), _number(row[f"certified_{c.value}"])) for c in Certifier],
            _cell(_percent(row["attacked"]), _number(row["attacked"])),
            _cell(_percent(row["gap"]), _number(row["gap"])),
            _cell(_percent(row["known_exactly"]), _number(row["known_exactly"])),
            *[_seconds(row[f"seconds_{c.value}"]) for c in Certifier],
        ])
    return (
        '<section id="certificates"><h2>Certificates</h2><p class="lede">Certified lower bounds beside the attacked upper '
        "bounds, at the radii the certify cells report: the true robust accuracy of each model lies between "
        "<i>certified</i> (every image of the ball provably keeps the prediction) and <i>attacked</i> (no verified "
        "adversarial example within the radius); <i>gap</i> is what neither side decides. Each row counts the same examples "
        "for every column.</p>"
        f"{_table('certificates-table', columns, rows)}</section>"
    )


def _violations_alarm(violations: pd.DataFrame) -> str:
    """A warning at the top of the page: certificates that verified attacks contradict, which no sound pair of tools can produce."""
    shown = violations.head(10).to_dict("records")
    items = "".join(
        f"<li>{html.escape(str(v['model']))}, example {v['example_index']}: certified at eps {v['eps']:g} by "
        f"{html.escape(str(v['certifier']))} (cell {html.escape(str(v['certify_cell_id']))}), broken at "
        f"{v['verified_distance']:.4g} by cell {html.escape(str(v['attack_cell_id']))}</li>"
        for v in shown
    )
    more = f"<li>and {len(violations) - len(shown)} more</li>" if len(violations) > len(shown) else ""
    return (
        f'<div class="alarm" role="alert"><b>Warning: {len(violations)} certificate(s) contradicted by verified attacks.</b> '
        "An example proven robust at a radius has a verified adversarial example within it: a certifier or the "
        f"verification is unsound, and neither bound on these models can be trusted.<ul>{items}{more}</ul></div>"
    )


def render_page(
    tables: list[LeaderboardTable],
    solvers: pd.DataFrame,
    figures: list[FigureEntry],
    attack_notes: dict[str, AttackNote],
    provenance: dict[str, str],
    certificates: pd.DataFrame | None = None,
    violations: pd.DataFrame | None = None,
) -> str:
    """The whole page as one HTML string.

    ``certificates`` (:func:`~harness.report.leaderboard.certificate_table`) adds the certificates section;
    ``violations`` (:func:`~harness.report.leaderboard.certificate_violations`), when not empty, a warning at the top.
    """
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    has_certificates = certificates is not None and not certificates.empty
    nav = "".join(f'<a href="#{t.group.slug}">{html.escape(t.group.title)}</a>' for t in tables)
    nav += '<a href="#certificates">Certificates</a>' if has_certificates else ""
    nav += '<a href="#solvers">Solvers</a><a href="#figures">Figures</a>'
    alarm = _violations_alarm(violations) if violations is not None and not violations.empty else ""
    meta = " · ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in provenance.items())
    figures_html = "".join(
        f'<figure id="figure-{html.escape(f.name)}"><img alt="{html.escape(f.caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(f.png).decode()}"><figcaption>{html.escape(f.caption)}</figcaption></figure>'
        for f in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Wasserstein robustness leaderboard</title><style>{_STYLE}</style></head>
<body><header><h1>Wasserstein robustness leaderboard</h1>
<p class="meta">generated {generated} · {meta}</p>
<p class="lede">Robust accuracy is the fraction of test examples for which no attack found an adversarial example
within the radius whose exact distance (an LP over the local transport plan) is at most that radius, with pixels in
[0, 1] and mass conserved. A model's row takes the worst case over every attack in its table, example by example.
A dash means the attacks did not search that far for every example. Click a column header to sort.</p>
<nav>{nav}</nav></header>
<main>{alarm}{''.join(_leaderboard_section(t, attack_notes) for t in tables)}
{_certificates_section(certificates) if has_certificates else ''}
{_solver_section(solvers)}
<section id="figures"><h2>Figures</h2>{figures_html or '<p class="lede">No figures: nothing to draw yet.</p>'}</section></main>
<script>{_SCRIPT}</script></body></html>
"""
