"""PNG plots of the model suite, made from its CSV (matplotlib, Agg backend).

- ``<stem>_throughput.png``: training throughput against parameter count, one panel per dtype;
- ``<stem>_memory.png``: peak memory of the training step per encoder and path;
- ``<stem>_speedup.png``: DCFormer fused against unfused (only when the CSV holds such pairs).

    python -m bench.plots bench/results/local/models_cpu.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import read_csv  # noqa: E402

__all__ = ["write_plots", "place_labels", "legend_entries", "training_rows"]

FAMILY_COLOURS = {"dcformer": "tab:red", "vit3d": "tab:blue", "convnext3d": "tab:green", "poolformer3d": "tab:purple"}
PATH_MARKERS = {"fused": "o", "unfused": "X", "pytorch": "s"}


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _colour(model: str) -> str:
    return FAMILY_COLOURS.get(model.split("_")[0], "tab:gray")


def _family_rank(model: str) -> int:
    family = model.split("_")[0]
    return list(FAMILY_COLOURS).index(family) if family in FAMILY_COLOURS else len(FAMILY_COLOURS)


def _short(model: str) -> str:
    return model.split("(")[0]


def training_rows(rows: list[dict], metric: str) -> list[dict]:
    """The training-pass rows of ``metric`` that hold a number (not an error or a skip note)."""
    return [r for r in rows if r["variant"] == "training" and r["metric"] == metric and _float(r["value"]) is not None]


def _params(rows: list[dict]) -> dict[str, float]:
    return {r["model"]: float(r["value"]) for r in rows if r["metric"] == "params" and r["variant"] == "eval"}


def plot_throughput(rows: list[dict], path: Path) -> Path:
    data = training_rows(rows, "throughput")
    params = _params(rows)
    dtypes = list(dict.fromkeys(r["dtype"] for r in data)) or ["float32"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7.5 * len(dtypes), 5.6), squeeze=False)
    shown = []  # the rows drawn, for the legend
    points_per_panel = []
    for ax, dtype in zip(axes[0], dtypes):
        points = []
        for r in (r for r in data if r["dtype"] == dtype and r["model"] in params):
            x, y = params[r["model"]] / 1e6, float(r["value"])
            unreliable = bool(r.get("flag"))
            ax.scatter(x, y, marker=PATH_MARKERS.get(r["backend"], "o"), s=60, zorder=3, linewidth=1.2,
                       color="white" if unreliable else _colour(r["model"]),
                       edgecolor=_colour(r["model"]) if unreliable else "black")
            low, high = _float(r["p20"]), _float(r["p80"])
            if low is not None and high is not None:
                ax.vlines(x, low, high, color=_colour(r["model"]), linewidth=1)
            label = _short(r["model"]) + (f" ({r['backend']})" if r["backend"] in ("fused", "unfused") else "")
            points.append((x, y, label))
            shown.append(r)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.margins(x=0.25, y=0.15)  # room for the labels of the outermost points
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("training throughput (volumes/s)")
        inputs = ", ".join(dict.fromkeys(r["input"] for r in data if r["dtype"] == dtype))
        ax.set_title(f"{dtype}, input {inputs}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        points_per_panel.append(points)
    _legend(fig, shown)
    fig.suptitle(f"Training step (fwd + bwd + AdamW) — {rows[0]['device'] if rows else ''}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    for ax, points in zip(axes[0], points_per_panel):  # after the layout: in the figure's final pixels
        place_labels(ax, points)
    return _save(fig, path, layout=False)


# Candidate label positions around a point, in points: right, left, above, below, then further out.
_LABEL_OFFSETS = [(5, 2, "left"), (-5, 2, "right"), (5, -10, "left"), (-5, -10, "right"), (0, 7, "center"),
                  (0, -15, "center"), (8, 12, "left"), (-8, 12, "right"), (8, -20, "left"), (-8, -20, "right"),
                  (0, 18, "center"), (0, -26, "center")]


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = 7) -> list:
    """Label each (x, y) point with its text where the label covers no other label and no marker,
    trying the positions of _LABEL_OFFSETS in turn (else the least covered one). Call after the
    figure's layout and axis limits are final. Returns the annotations."""
    fig = ax.figure
    ax.set_xlim(ax.get_xlim())  # freeze the limits: later drawing must not move the points
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    to_pixels = ax.transData.transform
    marker = 5.0 * fig.dpi / 72  # half the side of a 60-point² marker, in pixels
    occupied = [(px - marker, py - marker, px + marker, py + marker)
                for px, py in (to_pixels((x, y)) for x, y, _ in points)]
    axes_box = ax.get_window_extent(renderer)

    def covered(box) -> float:
        area = sum(max(0.0, min(box.x1, b[2]) - max(box.x0, b[0])) * max(0.0, min(box.y1, b[3]) - max(box.y0, b[1]))
                   for b in occupied)
        outside = box.width * box.height - max(0.0, min(box.x1, axes_box.x1) - max(box.x0, axes_box.x0)) * max(
            0.0, min(box.y1, axes_box.y1) - max(box.y0, axes_box.y0))
        return area + outside

    labels = []
    for (x, y, text), own in zip(points, list(occupied)):
        occupied.remove(own)  # a label may touch its own marker
        best = None
        for dx, dy, ha in _LABEL_OFFSETS:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha)
            box = label.get_window_extent(renderer)
            cost = covered(box)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        occupied += [own, (best[2].x0, best[2].y0, best[2].x1, best[2].y1)]
        labels.append(best[1])
    return labels


def plot_memory(rows: list[dict], path: Path) -> Path:
    params = _params(rows)
    data = sorted(training_rows(rows, "peak_memory"),
                  key=lambda r: (_family_rank(r["model"]), params.get(r["model"], 0), r["model"], r["backend"],
                                 r["dtype"]))
    labels = [f"{_short(r['model'])} {r['backend']} {r['dtype']}" for r in data]
    fig, ax = plt.subplots(figsize=(8, 0.32 * max(len(data), 4) + 1.2))
    ax.barh(range(len(data)), [float(r["value"]) for r in data], color=[_colour(r["model"]) for r in data])
    ax.set_yticks(range(len(data)), labels, fontsize=7)
    ax.invert_yaxis()
    unit = data[0]["unit"] if data else "MiB"
    ax.set_xlabel(f"training-step peak memory, {unit}", fontsize=8)
    inputs = ", ".join(dict.fromkeys(r["input"] for r in data))
    ax.set_title(f"Peak memory of one training step, input {inputs}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def plot_speedup(rows: list[dict], path: Path) -> Path | None:
    data = [r for r in rows if r["metric"] == "speedup" and _float(r["value"]) is not None]
    if not data:
        return None
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in data))
    variants = ["inference", "training"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 4))
    width = 0.38
    for i, variant in enumerate(variants):
        values = [next((float(r["value"]) for r in data
                        if (r["model"], r["dtype"]) == g and r["variant"] == variant), None) for g in groups]
        at = [k + (i - 0.5) * width for k in range(len(groups))]
        measured = [(x, v) for x, v in zip(at, values) if v is not None]
        ax.bar([x for x, _ in measured], [v for _, v in measured], width,
               label="forward" if variant == "inference" else "training step")
        for x in (x for x, v in zip(at, values) if v is None):  # a missing pair is marked, not drawn as 0
            ax.text(x, 0.05, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [f"{m}\n{d}" for m, d in groups], fontsize=7)
    ax.set_ylabel("speed-up, unfused time / fused time")
    ax.set_title(f"DCFormer fused kernels vs unfused PyTorch path — {data[0]['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def legend_entries(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(label, colour, marker) for the families and paths among ``rows`` only, and for the hollow
    marker of an unreliable figure if one is drawn."""
    families = {r["model"].split("_")[0] for r in rows}
    paths = {r["backend"] for r in rows}
    entries = [(f, c, "o") for f, c in FAMILY_COLOURS.items() if f in families]
    entries += [(p, "gray", m) for p, m in PATH_MARKERS.items() if p in paths]
    if any(r.get("flag") for r in rows):
        entries.append(("unreliable (hollow; see the .md)", "white", "o"))
    return entries


def _legend(fig, rows: list[dict]) -> None:
    handles = [plt.Line2D([], [], color=colour, marker=marker, linestyle="", label=label,
                          markeredgecolor="black" if colour == "white" else colour)
               for label, colour, marker in legend_entries(rows)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)


def _save(fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(csv_path: Path) -> list[Path]:
    """Write the plots next to ``csv_path``; returns the files written."""
    rows = read_csv(csv_path)
    stem = csv_path.with_suffix("")
    written = [plot_throughput(rows, Path(f"{stem}_throughput.png")), plot_memory(rows, Path(f"{stem}_memory.png"))]
    speedup = plot_speedup(rows, Path(f"{stem}_speedup.png"))
    return written + ([speedup] if speedup else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="a model-suite CSV (models_cpu.csv or models_gpu.csv)")
    for written in write_plots(parser.parse_args(argv).csv):
        print(written)


if __name__ == "__main__":
    main()
