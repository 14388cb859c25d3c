"""What a benchmark shows: speedup.png and the tables printed at the end."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..files import write_file
from .decoders import KANGAROO, TREE
from .out_dir import OWNER


def plot(summary: dict[str, Any], path: Path, overwrite: bool = False) -> None:
    """Speedup and τ per category, one bar per decoder compared with vanilla, written to ``path`` under
    files.write_file's policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*summary["categories"], "overall"]
    decoders = list(summary["decoders"].items())
    width = 0.8 / len(decoders)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6, (1.0 + 0.3 * len(decoders)) * len(names)), 3.8))
    for d, (label, table) in enumerate(decoders):
        rows = [*table["categories"].values(), table["overall"]]
        xs = [i - 0.4 + width * (d + 0.5) for i in range(len(names))]
        ax1.bar(xs, [r["speedup"] for r in rows], width, label=label)
        ax2.bar(xs, [r["tau"] for r in rows], width, label=label)
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_title("speedup vs vanilla (×)")
    ax2.set_title("τ (tokens per full forward)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), names, rotation=45)
    top = 1.0
    if len(decoders) > 1:  # above the plots, where no bar is
        handles, labels = ax1.get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(decoders), fontsize="small", frameon=False)
        top = 0.92
    fig.tight_layout(rect=(0, 0, 1, top))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_file(path, png.getvalue(), OWNER, overwrite=overwrite)


def _rows(table: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [*table["categories"].items(), ("overall", table["overall"])]


def print_table(summary: dict[str, Any]) -> None:
    """Kangaroo's rows (and its tree mode's) in full; every peer as a speedup column beside them."""
    from rich.console import Console
    from rich.table import Table

    decoders = summary["decoders"]
    rows = _rows(decoders[KANGAROO])
    if TREE in decoders:
        rows += [(f"{name} (tree)", r) for name, r in _rows(decoders[TREE])]
    peers = {name: d for name, d in decoders.items() if name not in (KANGAROO, TREE)}
    peer_cells = {
        name: [f"{r['speedup']:.3f}x" + ("" if r["identical"] else " (differs)") for _, r in _rows(peer)]
        for name, peer in peers.items()
    }
    temperature = summary.get("config", {}).get("temperature", 0.0)
    versus = "kangaroo" + "".join(f", {name}" for name in peers)
    table = Table(title=f"{versus} vs vanilla ({f'temperature {temperature}' if temperature else 'greedy'})")
    table.add_column("category", no_wrap=True, min_width=max(len(name) for name, _ in rows))
    columns = ("questions", "speedup", "τ", "vanilla tok/s", "kangaroo tok/s", "identical")
    for col in (*columns, *(f"{p} speedup" for p in peers)):
        table.add_column(col, justify="right")
    for i, (name, r) in enumerate(rows):
        table.add_row(
            name,
            str(r["questions"]),
            f"{r['speedup']:.3f}x",
            f"{r['tau']:.2f}",
            f"{r['vanilla_tokens_per_s']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            "n/a" if r["identical"] is None else "yes" if r["identical"] else "NO",
            *(cells[i] if i < len(cells) else "" for cells in peer_cells.values()),  # tree rows: no peer cells
        )
    Console(width=max(100 + sum(len(p) + 12 for p in peers), Console().width)).print(table)


def print_batch_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="batched throughput: kangaroo vs vanilla (tokens/s over the batch)")
    for col in ("batch size", "rows", "vanilla tok/s", "kangaroo tok/s", "speedup", "τ"):
        table.add_column(col, justify="right")
    for size, r in summary["batch"].items():
        table.add_row(
            size,
            str(r["rows"]),
            f"{r['vanilla_tokens_per_s']:.1f}",
            f"{r['kangaroo_tokens_per_s']:.1f}",
            f"{r['speedup']:.3f}x",
            f"{r['tau']:.2f}",
        )
    Console(width=max(100, Console().width)).print(table)
