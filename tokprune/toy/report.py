"""What `tokprune demo` writes: the table (markdown, JSON), the accuracy plot and the kept-tokens picture."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tokprune.toy.demo import N_PICTURES, DemoRow
from tokprune.toy.task import Sample

PICTURED_BUDGET = "keep 0.25"  # the budget the picture shows when it was run; else the first one run


def table(rows: list[DemoRow]) -> str:
    """Markdown table: accuracy, % of unpruned, visual tokens, FLOPs, measured prefill speed-up."""
    base = rows[0]
    lines = [
        "| method | budget | accuracy | % of unpruned | vis→LLM | vis avg/layer | GFLOPs/question | prefill speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = 100 * row.accuracy / base.accuracy if base.accuracy else float("nan")
        gflops = f"{row.flops / 1e9:.3f}" if row.flops else "—"
        speed = base.seconds / row.seconds if row.seconds else float("nan")
        lines.append(
            f"| {row.method} | {row.budget} | {100 * row.accuracy:.1f}% | {share:.1f}% | "
            f"{row.visual_to_llm:.1f} | {row.visual_layer_avg:.1f} | {gflops} | {speed:.2f}× |"
        )
    return "\n".join(lines)


def write_report(
    rows: list[DemoRow], samples: list[Sample], meta: dict, out: Path, grids: list[tuple[int, int] | None]
) -> dict[str, Path]:
    """Write demo.md, demo.json, accuracy_vs_tokens.png and, where the pictured questions' tokens form a
    plain grid (`grids`, see `demo.token_grids`), kept_tokens.png. Returns {kind: path} of what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "demo.md", "json": out / "demo.json"}
    paths["markdown"].write_text(f"# tokprune demo\n\n{json.dumps(meta)}\n\n{table(rows)}\n")
    records = [{**asdict(r), "accuracy": r.accuracy} for r in rows]
    paths["json"].write_text(json.dumps({"meta": meta, "rows": records}, indent=1))
    paths["plot"] = plot_accuracy(rows, out / "accuracy_vs_tokens.png")
    picture = picture_kept(rows, samples[:N_PICTURES], grids[:N_PICTURES], out / "kept_tokens.png")
    if picture is not None:
        paths["picture"] = picture
    return paths


def plot_accuracy(rows: list[DemoRow], path: Path) -> Path:
    """Accuracy against layer-averaged visual tokens, one line per method, the unpruned model as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    base = rows[0]
    ax.axhline(100 * base.accuracy, color="black", linestyle="--", label="unpruned")
    methods = list(dict.fromkeys(r.method for r in rows[1:]))
    cmap = plt.get_cmap("tab20")
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.visual_layer_avg)
        ax.plot(
            [r.visual_layer_avg for r in mine], [100 * r.accuracy for r in mine], marker="o", color=cmap(i % 20),
            label=method,
        )  # fmt: skip
    ax.set_xlabel("visual tokens per question (average over LLM layers)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy against kept visual tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pictured_rows(rows: list[DemoRow], preferred: str = PICTURED_BUDGET) -> list[DemoRow]:
    """The unpruned row, then every method at one budget: `preferred` if it was run, else the first
    budget of the pruned rows."""
    labels = [r.budget for r in rows[1:]]
    if not labels:
        return rows[:1]
    label = preferred if preferred in labels else labels[0]
    return [rows[0]] + [r for r in rows[1:] if r.budget == label]


def picture_kept(
    rows: list[DemoRow], samples: list[Sample], grids: list[tuple[int, int] | None], path: Path
) -> Path | None:
    """Rows = methods at one budget, columns = questions: the image with dropped tokens' cells dimmed.

    Questions whose tokens form no plain grid (grids[j] is None) are left out; None (nothing written)
    when no question has one."""
    columns = [(j, sample, grid) for j, (sample, grid) in enumerate(zip(samples, grids)) if grid is not None]
    if not columns:
        return None
    shown = pictured_rows(rows)
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(shown), len(columns), figsize=(1.9 * len(columns), 1.9 * len(shown)), squeeze=False
    )
    for i, row in enumerate(shown):
        for k, (j, sample, grid) in enumerate(columns):
            ax = axes[i][k]
            ax.imshow(dimmed(sample.image, row.kept[j] if j < len(row.kept) else [], grid))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{sample.question}\n→ {sample.answer}", fontsize=6)
            if k == 0:
                ax.set_ylabel(f"{row.method}\n{row.budget}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dimmed(image: np.ndarray, kept: list[int], grid: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 with every cell of the (rows, cols) token grid laid over the whole image that is
    not in `kept` (raster indices) darkened to a fifth. The toy task's images are square, so processors
    that resize or centre-crop to a square see all of the image."""
    rows, cols = grid
    height, width = image.shape[:2]
    cell_row = np.minimum(np.arange(height) * rows // height, rows - 1)
    cell_col = np.minimum(np.arange(width) * cols // width, cols - 1)
    cell = cell_row[:, None] * cols + cell_col[None, :]  # (H, W) raster index of each pixel's token
    mask = np.isin(cell, np.asarray(kept, dtype=np.int64))
    out = image.astype(np.float32)
    out[~mask] *= 0.2
    return out.astype(np.uint8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
