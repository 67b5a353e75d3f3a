"""A run's metrics as a terminal table, plots and a short Markdown report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

BASELINES = ("local", "fedavg", "fedavg_ft", "centralized")
GATE_COLORS = {"rangate": "tab:blue", "rollgate": "tab:orange", "fedavggate": "tab:green",
               "fedgate": "tab:red", "localgate": "tab:purple"}
# stage-1 method: (mix towards black (<0) or white (>0), dash pattern)
STAGE1_STYLES = {"fedce": (0.0, "--"), "fedsc": (-0.3, ":"), "hybrid": (0.4, "-.")}
BASELINE_STYLES = {"local": (0.65, "s"), "fedavg": (0.5, "o"), "fedavg_ft": (0.3, "^"),
                   "centralized": (0.0, "D")}
ROUTING_GATES = ("fedgate", "fedavggate", "localgate")
COLUMNS = ("method", "personalized %", "global %", "upload MB", "download MB")
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "synthetic": "Synthetic"}
DPI = 120
MAX_LABELLED = 40  # clients (experts) up to which every bar, cell value and tick is drawn
MAX_INCHES = 16.0  # a plot's width or height beyond MAX_LABELLED clients: pixels and text grow with N (N^2 for routing)
MAX_CELLS = 400  # heatmap rows (columns) drawn; beyond, blocks of rows (columns) are averaged: matplotlib's
# resampling of a 1000 x 1000 image into a 16-inch figure took ~200 MB, of 400 x 400 ~80 MB


def ordered(methods: dict[str, Any]) -> list[str]:
    """Baselines in their fixed order, then the other (NMoE) methods alphabetically."""
    return [n for n in BASELINES if n in methods] + sorted(n for n in methods if n not in BASELINES)


def rows(metrics: dict[str, Any]) -> list[tuple[str, ...]]:
    """One formatted row per method, in table order."""
    methods = metrics["methods"]
    return [(name, f"{100 * methods[name]['personalized_accuracy']:.2f}",
             f"{100 * methods[name]['global_accuracy']:.2f}",
             f"{methods[name]['upload_bytes'] / 1e6:.2f}", f"{methods[name]['download_bytes'] / 1e6:.2f}")
            for name in ordered(methods)]


def results_table(metrics: dict[str, Any]) -> str:
    """Aligned plain-text table: method, accuracies in percent, bytes in MB."""
    table = [COLUMNS, *rows(metrics)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(table[0]), "  ".join("-" * w for w in widths), *map(fmt, table[1:])])


def best(methods: dict[str, Any], key: str, names: list[str] | None = None) -> str | None:
    """The method with the highest `key` among `names` (default: all), None if there is none."""
    pool = [n for n in (methods if names is None else names) if n in methods]
    return max(pool, key=lambda n: methods[n][key]) if pool else None


def nmoe_parts(name: str) -> tuple[str, str]:
    """('fedce', 'fedgate') for 'nmoe_fedce_fedgate'; ('', '') for a baseline."""
    parts = name.split("_")
    return (parts[1], parts[-1]) if name.startswith("nmoe_") and len(parts) >= 3 else ("", "")


def shade(color: str, mix: float) -> tuple[float, float, float]:
    """`color` mixed with black (mix < 0) or white (mix > 0) by |mix|."""
    target = 1.0 if mix > 0 else 0.0
    r, g, b = ((1 - abs(mix)) * c + abs(mix) * target for c in to_rgb(color))
    return r, g, b


def style(name: str) -> dict[str, Any]:
    """Line style: baselines solid grey with a marker each, NMoE a colour family per gate and a
    shade plus dash pattern per stage-1 method."""
    if name in BASELINE_STYLES:
        grey, marker = BASELINE_STYLES[name]
        return {"color": str(grey), "linestyle": "-", "marker": marker}
    stage1, gate = nmoe_parts(name)
    mix, dash = STAGE1_STYLES.get(stage1, (0.0, "--"))
    return {"color": shade(GATE_COLORS.get(gate, "tab:brown"), mix), "linestyle": dash,
            "marker": None}


def headline(methods: dict[str, Any]) -> list[str]:
    """Baselines plus the best method per gate type: keeps crowded plots readable."""
    picks = [n for n in BASELINES if n in methods]
    gates = sorted({nmoe_parts(n)[1] for n in methods if n not in BASELINES})
    for gate in gates:
        pick = best(methods, "personalized_accuracy",
                    [n for n in methods if n not in BASELINES and nmoe_parts(n)[1] == gate])
        assert pick is not None  # each gate was read off a method's name
        picks.append(pick)
    return picks


def save(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG and free it."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def side_legend(ax: Axes, source: Axes | None = None) -> None:
    """Legend of `source`'s lines (default: ax's) to the right of ax, out of the data's way."""
    ax.legend(*(source or ax).get_legend_handles_labels(), fontsize=8, loc="center left",
              bbox_to_anchor=(1.01, 0.5), frameon=False)


def plot_curves(metrics: dict[str, Any], path: Path) -> bool:
    """Personalized and global accuracy per round, one line per method with a curve."""
    methods = {n: m for n, m in metrics["methods"].items() if m.get("curve")}
    if not methods:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True, sharey=True)
    for ax, kind in zip(axes, ("personalized", "global")):
        for name in ordered(methods):
            points = [(p["round"], p[f"{kind}_accuracy"]) for p in methods[name]["curve"]
                      if p.get(f"{kind}_accuracy") is not None]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.4, markersize=4,
                        markevery=max(1, len(points) // 10), **style(name))
        ax.set(title=f"{kind} accuracy per round", xlabel="round (NMoE: gate training round)",
               ylabel="accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    side_legend(axes[1], source=axes[0])  # every method with a curve has personalized points
    save(fig, path)
    return True


def plot_per_client(metrics: dict[str, Any], path: Path) -> bool:
    """Grouped bars of personalized accuracy per client; only headline methods if > 8."""
    methods = {n: m for n, m in metrics["methods"].items() if m.get("per_client")}
    if not methods:
        return False
    names = ordered(methods) if len(methods) <= 8 else headline(methods)
    clients = sorted({p["client"] for n in names for p in methods[n]["per_client"]})
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(min(MAX_INCHES, max(8.0, 0.9 * len(clients) + 4)), 4.8))
    for i, name in enumerate(names):
        acc = {p["client"]: p["personalized_accuracy"] for p in methods[name]["per_client"]}
        xs = [clients.index(c) + (i - (len(names) - 1) / 2) * width for c in acc]
        ax.bar(xs, list(acc.values()), width, label=name, color=style(name)["color"],
               hatch="//" if name.startswith("nmoe_") else None, edgecolor="white", linewidth=0.3)
    subset = "" if len(names) == len(methods) else "\n(baselines + best NMoE method per gate type)"
    ax.set(title=f"personalized accuracy per client{subset}", xlabel="client", ylabel="accuracy", ylim=(0, 1.0))
    if len(clients) <= MAX_LABELLED:
        ax.set(xticks=range(len(clients)), xticklabels=[str(c) for c in clients])
    ax.grid(axis="y", alpha=0.3)
    side_legend(ax)
    save(fig, path)
    return True


def block_means(matrix: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[np.ndarray, int]:
    """`matrix` with each k x k block replaced by its mean (the last blocks may be smaller), k the least
    factor that leaves at most `max_cells` rows and columns; and k (1: unchanged)."""
    k = -(-max(matrix.shape) // max_cells)
    if k == 1:
        return matrix, 1
    rows, cols = -(-matrix.shape[0] // k), -(-matrix.shape[1] // k)
    padded = np.full((rows * k, cols * k), np.nan, matrix.dtype)
    padded[:matrix.shape[0], :matrix.shape[1]] = matrix
    return np.nanmean(padded.reshape(rows, k, cols, k), axis=(1, 3)), k


def plot_routing(name: str, matrix: list[list[float]], path: Path) -> None:
    """Heatmap of routing shares, rows: client data, columns: expert, value in each cell (up to
    MAX_LABELLED experts; beyond, the heatmap alone, in a bounded figure; beyond MAX_CELLS, of block means)."""
    n_rows, n_cols = len(matrix), len(matrix[0])
    labelled = max(n_rows, n_cols) <= MAX_LABELLED
    size = (2.0 + 0.6 * n_cols, 1.2 + 0.55 * n_rows)
    fig, ax = plt.subplots(figsize=size if labelled else (min(MAX_INCHES, size[0]), min(MAX_INCHES, size[1])))
    shown, k = block_means(np.asarray(matrix, np.float32))
    # extent: the axes keep counting clients and experts when blocks are drawn
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1,
                      extent=(-0.5, shown.shape[1] * k - 0.5, shown.shape[0] * k - 0.5, -0.5))
    if labelled:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
        ax.set(xticks=range(n_cols), yticks=range(n_rows))
    blocks = f", each cell the mean of {k} x {k}" if k > 1 else ""
    ax.set(title=f"routing of {name}\n(row: client's test data, column: expert{blocks})", xlabel="expert",
           ylabel="client data")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of top-k selections")
    save(fig, path)


def plot_summary(metrics: dict[str, Any], path: Path) -> bool:
    """Horizontal bars of personalized and global accuracy per method, in table order."""
    methods = metrics["methods"]
    names = ordered(methods)
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.36 * len(names)))
    for offset, kind, color in ((-0.2, "personalized", "tab:blue"), (0.2, "global", "tab:orange")):
        values = [methods[n][f"{kind}_accuracy"] for n in names]
        bars = ax.barh([i + offset for i in range(len(names))], values, 0.4, color=color,
                       label=f"{kind} accuracy")
        ax.bar_label(bars, labels=[f"{100 * v:.1f}" for v in values], padding=2, fontsize=6.5)
    ax.set(yticks=range(len(names)), yticklabels=names, xlabel="accuracy", xlim=(0, 1.08),
           ylim=(len(names) - 0.5, -0.5))
    ax.set_title("accuracy per method (labels in %)", pad=22)
    baselines = sum(n in BASELINES for n in names)
    if 0 < baselines < len(names):
        ax.axhline(baselines - 0.5, color="0.5", linewidth=0.8)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)
    return True


def routing_picks(methods: dict[str, Any]) -> list[str]:
    """The best (personalized accuracy) method with routing for each of fedgate, fedavggate,
    localgate."""
    picks = [best(methods, "personalized_accuracy",
                  [n for n in methods if nmoe_parts(n)[1] == gate and methods[n].get("routing")])
             for gate in ROUTING_GATES]
    return [p for p in picks if p]


def write_plots(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots into out_dir (created if missing); a plot whose data is absent is skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = metrics["methods"]
    plots: list[tuple[str, Callable[[dict[str, Any], Path], bool]]] = [
        ("accuracy_per_round.png", plot_curves), ("per_client_accuracy.png", plot_per_client)]
    written = [out_dir / f for f, plot in plots if plot(metrics, out_dir / f)]
    for name in routing_picks(methods):
        plot_routing(name, methods[name]["routing"], out_dir / f"routing_{name}.png")
        written.append(out_dir / f"routing_{name}.png")
    if plot_summary(metrics, out_dir / "summary.png"):
        written.append(out_dir / "summary.png")
    return written


def setting(metrics: dict[str, Any]) -> str:
    """E.g. 'Fashion-MNIST, 10 clients, Dirichlet(alpha=0.5)'."""
    data = metrics.get("config", {}).get("data", {})
    dataset = metrics.get("dataset") or data.get("dataset", "unknown dataset")
    partition = data.get("partition", "")
    split = {"iid": "IID", "dirichlet": f"Dirichlet(alpha={data.get('alpha')})",
             "shards": f"shards, {data.get('classes_per_client', '?')} classes per client"}
    parts = [DATASET_NAMES.get(dataset, dataset), f"{data.get('num_clients', '?')} clients",
             split.get(partition, partition)]
    return ", ".join(p for p in parts if p)


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s' or '2 h 07 min'."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def about(metrics: dict[str, Any]) -> str:
    """One line on the machine, elapsed time and config hash."""
    m = metrics.get("machine", {})
    return (f"Machine: {m.get('processor') or '?'}, {m.get('cpus', '?')} CPUs, "
            f"{m.get('platform', '?')}; Python {m.get('python', '?')}, torch {m.get('torch', '?')}. "
            f"Elapsed: {duration(metrics.get('elapsed_seconds', 0.0))}. "
            f"Config hash `{metrics.get('config_hash', '')[:12]}`.")


def markdown_table(metrics: dict[str, Any]) -> list[str]:
    """The results table as Markdown, same rows and formatting as results_table."""
    return ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1),
            *("| " + " | ".join(r) + " |" for r in rows(metrics))]


def best_section(methods: dict[str, Any]) -> list[str]:
    """The best method by personalized and by global accuracy, overall and among NMoE methods."""
    nmoe = [n for n in methods if n.startswith("nmoe_")]
    lines = ["## Best", ""]
    for label, pool in (("", None), ("NMoE ", nmoe)):
        for kind in ("personalized", "global"):
            name = best(methods, f"{kind}_accuracy", pool)
            if name:
                lines.append(f"- {label}{kind} accuracy: **{name}** "
                             f"({100 * methods[name][f'{kind}_accuracy']:.2f}%)")
    return lines


def compute_section(compute: dict[str, Any]) -> list[str]:
    """Per-device MACs per sample and fp32 parameter memory."""
    lines = ["## Compute and memory per device", "",
             "| deployment | MACs per sample | parameters | fp32 memory KB | what |",
             "|---|---:|---:|---:|---|"]
    for name, r in compute.get("per_device", {}).items():
        lines.append(f"| {name} | {r['macs']:,} | {r['params']:,} | {r['params'] * 4 / 1000:.1f} "
                     f"| {r.get('note', '')} |")
    return lines


def write_report(metrics: dict[str, Any], run_dir: Path) -> Path:
    """Plots into run_dir/plots and run_dir/report.md; returns the report's path."""
    plots = write_plots(metrics, run_dir / "plots")
    methods = metrics["methods"]
    lines = [f"# NMoE run: {setting(metrics)}", "", about(metrics), "", "## Results", "",
             *markdown_table(metrics)]
    if methods:
        lines += ["", *best_section(methods)]
    if metrics.get("compute", {}).get("per_device"):
        lines += ["", *compute_section(metrics["compute"])]
    if plots:
        lines += ["", "## Plots"]
        for plot in plots:
            lines += ["", f"![{plot.stem}](plots/{plot.name})"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
