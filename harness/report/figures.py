"""The report's figures, drawn with seaborn from the store's tables.

Every function takes frames read from the store and returns a matplotlib
:class:`~matplotlib.figure.Figure` (built without pyplot, so no global
figure state and no display are needed), or None when the results hold
nothing to draw. Models keep one colour across all figures
(:func:`model_palette`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..vocabulary import VerificationStatus
from .leaderboard import LeaderboardTable, ThreatGroup, attack_label, certified_radii, chosen_certificates, model_curves, worst_case

_VERIFIED = VerificationStatus.VERIFIED.name

__all__ = [
    "accuracy_against_radius",
    "gallery",
    "kernel_sizes",
    "lambda_p",
    "lambda_p_gallery",
    "main_groups",
    "model_palette",
    "solver_cost",
]

_PANEL = 3.2


def model_palette(models) -> dict[str, tuple]:
    """One colour per model name, assigned in sorted order."""
    names = sorted(pd.Series(models).unique())
    colours = sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))
    return dict(zip(names, colours))


def _solver_name(examples: pd.DataFrame) -> np.ndarray:
    """The attack of each row without its lambda: curves take the worst case over lambdas."""
    attacks = examples[["solver", "clamp", "step_rule", "suite", "suite_version"]]
    # Named once per distinct attack, in the order of first appearance, which numbers the groups too.
    distinct = attacks.drop_duplicates()
    names = np.array([
        attack_label(solver, clamp, None, step_rule, suite, version)
        for solver, clamp, step_rule, suite, version in distinct.itertuples(index=False, name=None)
    ], dtype=object)
    return names[attacks.groupby(list(attacks.columns), dropna=False, sort=False).ngroup().to_numpy()]


def accuracy_against_radius(
    examples: pd.DataFrame, groups: list[ThreatGroup], palette: dict, certificates: pd.DataFrame | None = None
) -> Figure | None:
    """Robust accuracy against radius from verified distances (paper Figures 4 and 5).

    One facet per group (the main ball of each data set), one colour per
    model, one line style per solver (worst case over its lambdas). A model
    with ``certificates`` on the group's ball gets a band of its colour
    between its certified curve (the share whose certified radius is at
    least eps) and its attacked one (worst case over its attacks), both on
    the examples the two share: the true robust accuracy lies inside.
    """
    if not groups:
        return None
    chosen = chosen_certificates(certificates) if certificates is not None else None
    bands = chosen["model"].nunique() if chosen is not None and len(chosen) else 0
    figure = _figure_with_legend(len(groups), examples["model"].nunique() + examples["solver"].nunique() + bands + 2)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for axis, group in zip(axes, groups):
        mine = examples[group.select(examples)]
        curves = model_curves(mine.assign(solver=_solver_name(mine)), ["model", "solver"])
        models = sorted(curves["model"].unique())
        sns.lineplot(
            data=curves, x="eps", y="robust_accuracy", hue="model", hue_order=models, style="solver",
            style_order=sorted(curves["solver"].unique()), palette=palette, ax=axis, drawstyle="steps-post",
        )
        if bands:
            certified_here = chosen[group.select(chosen)]
            for model in models:
                model_certificates = certified_here[certified_here["model"] == model]
                if len(model_certificates):
                    _certified_band(axis, mine[mine["model"] == model], model_certificates, model, palette.get(model, "black"))
        axis.set(title=group.title, xlabel="radius eps", ylabel="robust accuracy (verified)", ylim=(-0.02, 1.02))
        _legend_outside(axis)
    return figure


def _certified_band(axis, model_examples: pd.DataFrame, model_certificates: pd.DataFrame, model: str, colour) -> None:
    """Shade between the certified and the attacked robust accuracy of one model, up to the attacks' search."""
    per_example = worst_case(model_examples)
    certified = certified_radii(model_certificates)
    shared = per_example.index.intersection(certified.index)
    if shared.empty:
        return
    reach = float(per_example.loc[shared, "reach"].min())
    verified = per_example.loc[shared, "verified_distance"].to_numpy(dtype=np.float64)
    radii = certified.loc[shared].to_numpy(dtype=np.float64)
    # Both curves are step functions: evaluate them at every step, and just past each certified radius (where the
    # certified share drops: a certificate at r covers r itself). From just above 0: a certified radius of 0 proves
    # nothing, not even that the clean image is classified correctly.
    steps = np.concatenate([np.linspace(0.0, reach, 120), verified, radii, np.nextafter(radii, np.inf)])
    eps = np.unique(steps[(steps > 0) & (steps <= reach)])
    attacked = (verified[None, :] > eps[:, None]).mean(axis=1)
    proven = (radii[None, :] >= eps[:, None]).mean(axis=1)
    axis.fill_between(eps, proven, attacked, step="post", color=colour, alpha=0.2, linewidth=0, label=f"{model}: certified to attacked")


_LEGEND_ROWS = 22


def _figure_with_legend(panels: int, entries: int) -> Figure:
    """A row of panels, each with room on its right for a legend of ``entries`` lines."""
    columns = math.ceil(entries / _LEGEND_ROWS)
    height = max(_PANEL * 1.25, 0.16 * math.ceil(entries / columns) + 0.6)
    return Figure(figsize=(panels * (_PANEL * 1.3 + 1.9 * columns), height), layout="constrained")


def _legend_outside(axis) -> None:
    entries = len(axis.get_legend_handles_labels()[0])
    axis.legend(
        fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
        ncol=max(1, math.ceil(entries / _LEGEND_ROWS)),
    )


def kernel_sizes(examples: pd.DataFrame, palette: dict) -> Figure | None:
    """Robust accuracy against radius for several kernel sizes (paper Figure 7): one facet per model and p."""
    with_geometry = examples[examples["kernel_size"].notna()]
    panels = [
        (key, rows) for key, rows in with_geometry.groupby(["dataset", "model", "p"])
        if rows["kernel_size"].nunique() >= 2
    ]
    if not panels:
        return None
    figure = Figure(figsize=(_PANEL * 1.4 * len(panels), _PANEL * 1.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, ((dataset, model, p), rows) in zip(axes, panels):
        curves = model_curves(rows, ["kernel_size"])
        curves["kernel"] = curves["kernel_size"].map(lambda k: f"{k}x{k}")
        order = [f"{k}x{k}" for k in sorted(rows["kernel_size"].unique())]
        sns.lineplot(
            data=curves, x="eps", y="robust_accuracy", hue="kernel", hue_order=order,
            palette="viridis", ax=axis, drawstyle="steps-post",
        )
        axis.set(xlabel="radius eps", ylabel="robust accuracy (verified)", ylim=(-0.02, 1.02))
        axis.set_title(f"{model}, p = {p:g}", color=palette.get(model, "black"))
        axis.legend(fontsize="x-small", title="kernel", frameon=False)
    return figure


def _lambda_p_panels(examples: pd.DataFrame):
    with_geometry = examples[examples["kernel_size"].notna()]
    return [
        (key, rows) for key, rows in with_geometry.groupby(["dataset", "model", "kernel_size", "solver"])
        if rows["lam"].nunique() >= 2 and rows["p"].nunique() >= 2
    ]


def lambda_p(examples: pd.DataFrame, palette: dict) -> Figure | None:
    """Median verified radius of the successes for each (lambda, p) (paper Figure 8), with the verified success rate."""
    panels = _lambda_p_panels(examples)
    if not panels:
        return None
    figure = Figure(figsize=(_PANEL * 1.5 * len(panels), _PANEL * 1.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, ((dataset, model, kernel_size, solver), rows) in zip(axes, panels):
        verified = rows["verification_status"] == _VERIFIED
        radius = rows[verified].groupby(["p", "lam"])["verified_distance"].median().unstack("lam")
        rate = verified.groupby([rows["p"], rows["lam"]]).mean().unstack("lam")
        radius = radius.reindex(index=rate.index, columns=rate.columns)
        text = np.vectorize(lambda r, s: f"{r:.2f}\n{100 * s:.0f}%" if not math.isnan(r) else ("not run" if math.isnan(s) else "none\n0%"))(
            radius.to_numpy(dtype=float), rate.to_numpy(dtype=float)
        )
        sns.heatmap(radius, annot=text, fmt="", cmap="mako_r", ax=axis, cbar_kws={"label": "median verified radius"})
        # seaborn leaves cells without a value blank; say that nothing was verified there.
        axis.set_facecolor("#eeeeee")
        for row, column in zip(*np.nonzero(np.isnan(radius.to_numpy(dtype=float)))):
            axis.text(column + 0.5, row + 0.5, text[row, column], ha="center", va="center", fontsize="small", color="#555555")
        axis.set(xlabel="lambda", ylabel="p")
        axis.set_xticklabels([f"{v:g}" for v in radius.columns])
        axis.set_yticklabels([f"{v:g}" for v in radius.index], rotation=0)
        axis.set_title(f"{model}, {kernel_size}x{kernel_size}, {solver}\n(verified success rate below)", color=palette.get(model, "black"))
    return figure


def _as_picture(flat, channels: int, height: int, width: int) -> np.ndarray:
    image = np.asarray(flat, dtype=np.float32).reshape(channels, height, width)
    return image[0] if channels == 1 else image.transpose(1, 2, 0).clip(0.0, 1.0)


def _show(axis, picture: np.ndarray, title: str = "", colour="black") -> None:
    if picture.ndim == 2:
        axis.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        axis.imshow(picture)
    axis.set_title(title, fontsize="small", color=colour)
    axis.set_xticks([])
    axis.set_yticks([])


def _perturbation(axis, original: np.ndarray, adversarial: np.ndarray) -> None:
    delta = adversarial - original
    if delta.ndim == 3:
        delta = delta.sum(axis=2)  # mass moved per pixel, summed over colour channels
    limit = float(np.abs(delta).max()) or 1.0
    axis.imshow(delta, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axis.set_title(f"perturbation ±{limit:.2f}", fontsize="small")
    axis.set_xticks([])
    axis.set_yticks([])


def _joined(images: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    columns = ["cell_id", "example_index", "model", "solver", "clamp", "lam", "step_rule", "kernel_size", "p", "label",
               "adversarial_prediction", "verification_status", "verified_distance", "eps_found"]
    return images.merge(examples[columns], on=["cell_id", "example_index"], suffixes=("", "_example"))


def gallery(
    images: pd.DataFrame,
    examples: pd.DataFrame,
    group: ThreatGroup,
    palette: dict,
    models: list[str],
    per_model: int = 3,
    max_models: int = 8,
) -> Figure | None:
    """Original, signed perturbation and adversarial image per model (paper Figures 2, 3, 6).

    One row for each of the first ``max_models`` of ``models`` (in that
    order) whose images are stored. For each model and
    example, the attack with the smallest verified distance supplies the
    adversarial image; the same example indices are shown for every model.
    """
    mine = examples[group.select(examples)]
    joined = _joined(images, mine) if len(images) else images
    if joined.empty:
        return None
    verified = joined[joined["verification_status"] == _VERIFIED]
    models = [model for model in models if model in set(joined["model"])][:max_models]
    if not models:
        return None
    common = sorted(set.intersection(*(set(verified.loc[verified["model"] == m, "example_index"]) for m in models)) or
                    set(verified["example_index"]))[:per_model]
    if not common:
        return None
    figure = Figure(figsize=(1.6 * 3 * len(common), 1.8 * len(models) + 0.4), layout="constrained")
    axes = figure.subplots(len(models), 3 * len(common), squeeze=False)
    for row, model in enumerate(models):
        for slot, index in enumerate(common):
            candidates = verified[(verified["model"] == model) & (verified["example_index"] == index)]
            cells = axes[row, 3 * slot : 3 * slot + 3]
            if slot == 0:
                cells[0].text(-0.08, 0.5, model, rotation=90, transform=cells[0].transAxes, ha="right", va="center",
                              fontsize="small", color=palette.get(model, "black"))
            if candidates.empty:
                for axis in cells:
                    axis.axis("off")
                cells[1].set_title("no verified example", fontsize="small")
                continue
            best = candidates.sort_values("verified_distance").iloc[0]
            shape = (int(best["channels"]), int(best["height"]), int(best["width"]))
            original = _as_picture(best["original"], *shape)
            adversarial = _as_picture(best["adversarial"], *shape)
            _show(cells[0], original, f"#{index}: class {best['label']}")
            _perturbation(cells[1], original, adversarial)
            _show(cells[2], adversarial, f"eps {best['verified_distance']:.2f}: {best['label']}→{best['adversarial_prediction']}")
    figure.suptitle(f"{group.title}: original, perturbation, adversarial (exact distance, labels)", fontsize="medium")
    return figure


def lambda_p_gallery(images: pd.DataFrame, examples: pd.DataFrame) -> Figure | None:
    """One adversarial example per (lambda, p) for the same test image (paper Figure 8)."""
    panels = _lambda_p_panels(examples)
    if not panels or images.empty:
        return None
    (dataset, model, kernel_size, solver), rows = panels[0]
    joined = _joined(images, rows)
    if joined.empty:
        return None
    verified_count = joined[joined["verification_status"] == _VERIFIED].groupby("example_index").size()
    if verified_count.empty:
        return None
    index = int(verified_count.idxmax())
    chosen = joined[joined["example_index"] == index]
    ps, lams = sorted(chosen["p"].unique()), sorted(chosen["lam"].unique())
    figure = Figure(figsize=(1.5 * len(lams) + 0.6, 1.6 * len(ps) + 0.6), layout="constrained")
    axes = figure.subplots(len(ps), len(lams), squeeze=False)
    for i, p in enumerate(ps):
        for j, lam in enumerate(lams):
            axis = axes[i, j]
            match = chosen[(chosen["p"] == p) & (chosen["lam"] == lam)]
            if match.empty:
                axis.axis("off")
                continue
            item = match.iloc[0]
            shape = (int(item["channels"]), int(item["height"]), int(item["width"]))
            if item["verification_status"] == _VERIFIED:
                title = f"{item['verified_distance']:.2f}: →{item['adversarial_prediction']}"
            else:
                title = item["verification_status"].lower().replace("_", " ")
            _show(axis, _as_picture(item["adversarial"], *shape), title)
            if j == 0:
                axis.set_ylabel(f"p = {p:g}")
            if i == len(ps) - 1:
                axis.set_xlabel(f"λ = {lam:g}")
    figure.suptitle(f"{model}, {kernel_size}x{kernel_size}, {solver}: test image #{index}", fontsize="medium")
    return figure


def solver_cost(solvers: pd.DataFrame, palette: dict) -> Figure | None:
    """Seconds per example against the robust accuracy each attack reached alone: lower and to the left is better."""
    if solvers.empty or solvers["robust_accuracy"].isna().all():
        return None
    threats = list(dict.fromkeys(solvers["threat"]))
    figure = _figure_with_legend(len(threats), solvers["model"].nunique() + solvers["attack"].nunique() + 2)
    axes = figure.subplots(1, len(threats), squeeze=False)[0]
    for axis, threat in zip(axes, threats):
        rows = solvers[(solvers["threat"] == threat) & solvers["robust_accuracy"].notna()]
        if rows.empty:
            axis.axis("off")
            continue
        sns.scatterplot(
            data=rows, x="seconds_per_example", y="robust_accuracy", hue="model", hue_order=sorted(rows["model"].unique()),
            style="attack", style_order=sorted(rows["attack"].unique()), palette=palette, s=70, ax=axis,
        )
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set(
            title=f"{threat}\nrobust accuracy at eps {rows['radius'].iloc[0]:.2f}", xlabel="seconds per example (attack + verification)",
            ylabel="robust accuracy (verified)", ylim=(-0.02, 1.02),
        )
        _legend_outside(axis)
    return figure


def main_groups(tables: list[LeaderboardTable]) -> list[ThreatGroup]:
    """The main group of each data set: the first table of each."""
    seen, groups = set(), []
    for table in tables:
        if table.group.dataset not in seen:
            seen.add(table.group.dataset)
            groups.append(table.group)
    return groups
