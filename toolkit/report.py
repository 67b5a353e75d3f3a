"""A run's metrics as a terminal table, plots and a short Markdown report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

BASELINES = ("local", "fedavg", "fedavg_ft", "centralized")
GATES = ("rangate", "rollgate", "fedavggate", "fedgate", "localgate")
COLUMNS = ("method", "personalized %", "global %", "upload MB", "download MB")


def ordered(methods: dict) -> list[str]:
    """Baselines in their fixed order, then NMoE methods alphabetically."""
    return [n for n in BASELINES if n in methods] + sorted(n for n in methods if n not in BASELINES)


def rows(metrics: dict) -> list[tuple[str, ...]]:
    """One formatted row per method."""
    out = []
    for name in ordered(metrics["methods"]):
        m = metrics["methods"][name]
        out.append((name, f"{100 * m['personalized_accuracy']:.2f}", f"{100 * m['global_accuracy']:.2f}",
                    f"{m['upload_bytes'] / 1e6:.2f}", f"{m['download_bytes'] / 1e6:.2f}"))
    return out


def results_table(metrics: dict) -> str:
    """Aligned plain-text table: method, accuracies in percent, bytes in MB."""
    table = [COLUMNS, *rows(metrics)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(table[0]), "  ".join("-" * w for w in widths), *map(fmt, table[1:])])


def best(methods: dict, key: str, names: list[str] | None = None) -> str | None:
    """The method with the highest `key` among `names` (default: all)."""
    pool = [n for n in (names if names is not None else methods) if n in methods]
    return max(pool, key=lambda n: methods[n][key]) if pool else None


def gate_of(name: str) -> str:
    return name.rsplit("_", 1)[-1] if name.startswith("nmoe_") else name


def style(name: str) -> dict:
    """Baselines solid, NMoE dashed and coloured by gate."""
    if name in BASELINES:
        return {"linestyle": "-", "color": plt.cm.Greys(0.45 + 0.15 * BASELINES.index(name))}
    return {"linestyle": "--", "color": plt.cm.tab10(GATES.index(gate_of(name)) if gate_of(name) in GATES else 9)}


def headline(methods: dict) -> list[str]:
    """Baselines plus the best method per gate: keeps crowded plots readable."""
    picks = [n for n in BASELINES if n in methods]
    for gate in GATES:
        b = best(methods, "personalized_accuracy", [n for n in methods if n.endswith(f"_{gate}")])
        if b:
            picks.append(b)
    return picks


def plot_curves(metrics: dict, path: Path) -> bool:
    methods = {n: m for n, m in metrics["methods"].items() if m.get("curve")}
    if not methods:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, key, title in zip(axes, ("personalized_accuracy", "global_accuracy"), ("personalized", "global")):
        for name in ordered(methods):
            pts = [(p["round"], p[key]) for p in methods[name]["curve"] if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, marker=".", **style(name))
        ax.set(title=f"{title} accuracy per round", xlabel="round (NMoE: gate round)", ylabel="accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_per_client(metrics: dict, path: Path) -> bool:
    methods = metrics["methods"]
    names = ordered(methods) if len(methods) <= 8 else headline(methods)
    if not names:
        return False
    clients = [p["client"] for p in methods[names[0]]["per_client"]]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(clients) + 3), 4.8))
    for i, name in enumerate(names):
        acc = [p["personalized_accuracy"] for p in methods[name]["per_client"]]
        ax.bar([c + (i - (len(names) - 1) / 2) * width for c in clients], acc, width, label=name,
               color=style(name)["color"], hatch="//" if name.startswith("nmoe_") else None, edgecolor="white")
    subset = "" if len(names) == len(methods) else " (baselines + best NMoE per gate)"
    ax.set(title=f"personalized accuracy per client{subset}", xlabel="client", ylabel="accuracy", xticks=clients)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_routing(name: str, matrix: list[list[float]], path: Path) -> None:
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax.set(title=f"routing of {name}\n(row: client's test data, column: expert)", xlabel="expert",
           ylabel="client data", xticks=range(n), yticks=range(n))
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of top-k selections")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_summary(metrics: dict, path: Path) -> None:
    names = ordered(metrics["methods"])[::-1]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(names)))
    y = range(len(names))
    for offset, key, color in ((-0.2, "personalized_accuracy", "tab:blue"), (0.2, "global_accuracy", "tab:orange")):
        ax.barh([i + offset for i in y], [metrics["methods"][n][key] for n in names], 0.4,
                color=color, label=key.replace("_", " "))
    ax.set(yticks=list(y), yticklabels=names, xlabel="accuracy", xlim=(0, 1), title="accuracy per method")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(metrics: dict, out_dir: Path) -> list[Path]:
    """PNG plots into out_dir; a plot whose data is absent is skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, plot in (("accuracy_per_round.png", plot_curves), ("per_client_accuracy.png", plot_per_client)):
        if plot(metrics, out_dir / filename):
            written.append(out_dir / filename)
    methods = metrics["methods"]
    for gate in ("fedgate", "fedavggate", "localgate"):
        name = best(methods, "personalized_accuracy", [n for n in methods if n.endswith(f"_{gate}") and "routing" in methods[n]])
        if name:
            plot_routing(name, methods[name]["routing"], out_dir / f"routing_{name}.png")
            written.append(out_dir / f"routing_{name}.png")
    if methods:
        plot_summary(metrics, out_dir / "summary.png")
        written.append(out_dir / "summary.png")
    return written


def setting(cfg: dict) -> str:
    """E.g. 'fashion_mnist, 10 clients, Dirichlet(alpha=0.5)'."""
    d = cfg["data"]
    split = {"iid": "IID", "dirichlet": f"Dirichlet(alpha={d['alpha']})",
             "shards": f"shards, {d['classes_per_client']} classes per client"}[d["partition"]]
    return f"{d['dataset']}, {d['num_clients']} clients, {split}"


def compute_table(compute: dict) -> list[str]:
    lines = ["| deployment | MACs per sample | parameters | fp32 memory KB | what |", "|---|---:|---:|---:|---|"]
    for name, r in compute["per_device"].items():
        lines.append(f"| {name} | {r['macs']:,} | {r['params']:,} | {r['params'] * 4 / 1000:.1f} | {r['note']} |")
    return lines


def write_report(metrics: dict, run_dir: Path) -> Path:
    """plots/ and report.md in run_dir; returns the report's path."""
    plots = write_plots(metrics, run_dir / "plots")
    methods = metrics["methods"]
    mach = metrics.get("machine", {})
    about = (f"Machine: {mach.get('processor', '?')}, {mach.get('cpus', '?')} cores, "
             f"Python {mach.get('python', '?')}, torch {mach.get('torch', '?')}. "
             f"Elapsed: {metrics.get('elapsed_seconds', 0):.0f} s. Config hash `{metrics.get('config_hash', '')[:12]}`.")
    lines = [f"# NMoE run: {setting(metrics['config'])}", "", about, "",
             "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(metrics)]
    if methods:
        bp, bg = best(methods, "personalized_accuracy"), best(methods, "global_accuracy")
        lines += ["", "## Best", "",
                  f"- personalized accuracy: **{bp}** ({100 * methods[bp]['personalized_accuracy']:.2f}%)",
                  f"- global accuracy: **{bg}** ({100 * methods[bg]['global_accuracy']:.2f}%)"]
    if metrics.get("compute"):
        lines += ["", "## Compute and memory per device", "", *compute_table(metrics["compute"])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
