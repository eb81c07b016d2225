"""What `tokprune demo` writes: the table (markdown, JSON), the accuracy plot (small multiples by method
family) and the kept-tokens picture (a grid of cells, one per method)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tokprune.bench.report import (
    Series,
    legend_labels,
    method_panels,
    pyplot,
    save_figure,
    save_quantised,
    small_multiples,
)
from tokprune.toy.demo import N_PICTURES, DemoRow
from tokprune.toy.task import Sample

PICTURED_BUDGET = "keep 0.25"  # the budget the picture shows when it was run; else the first one run
# kept-token picture: pixels of one question's image, questions per mosaic row, cells per picture row,
# white gap between a mosaic's images, margins, a cell's name line and a header line, text size and the
# number badge's side in the unpruned cell
TILE, MOSAIC_COLUMNS, PICTURE_COLUMNS, GAP = 112, 2, 5, 2
MARGIN, LABEL, LINE, FONT_SIZE, BADGE = 14, 22, 22, 15, 18


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
    paths["plot"] = plot_accuracy(rows, out / "accuracy_vs_tokens.png", meta)
    picture = picture_kept(rows, samples[:N_PICTURES], grids[:N_PICTURES], out / "kept_tokens.png", meta)
    if picture is not None:
        paths["picture"] = picture
    return paths


def fraction_text(budget: str) -> str:
    """'keep 0.125' -> 'keep 1/8' where the ratio is one over a whole number; any other label unchanged."""
    if not budget.startswith("keep "):
        return budget
    ratio = float(budget.split()[1])
    whole = round(1 / ratio) if ratio > 0 else 0
    return f"keep 1/{whole}" if whole > 1 and abs(1 / ratio - whole) < 1e-6 else budget


def accuracy_title(rows: list[DemoRow], meta: dict) -> str:
    """'<model>: accuracy against kept visual tokens, <n> held-out questions' over 'budgets keep 1/2,
    keep 1/4, ...; dashed line and star: unpruned (<accuracy>)'."""
    budgets = ", ".join(dict.fromkeys(fraction_text(r.budget) for r in rows[1:])) or "none"
    questions = meta.get("questions", rows[0].total)
    return (
        f"{meta.get('model', 'model')}: accuracy against kept visual tokens, {questions} held-out questions\n"
        f"budgets {budgets}; dashed line and star: unpruned ({100 * rows[0].accuracy:.1f}%)"
    )


def accuracy_figure(rows: list[DemoRow], meta: dict):
    """The accuracy plot as a matplotlib figure: one small panel per method family
    (`bench.report.method_panels`), each method a line over its budgets (x = layer-averaged visual tokens
    per question, y = accuracy in %), the unpruned model (rows[0]) in every panel; axes hold every point."""
    base = rows[0]
    panels = method_panels(list(dict.fromkeys(r.method for r in rows[1:])))
    lines = {title: accuracy_lines(rows[1:], members) for title, members in panels.items()}
    reference = (base.visual_layer_avg, 100 * base.accuracy, f"unpruned ({100 * base.accuracy:.1f}%)")
    labels = (
        "visual tokens per question (average over LLM layers)",
        "accuracy (%)",
        accuracy_title(rows, meta),
    )
    return small_multiples(lines, reference, labels)


def accuracy_lines(rows: list[DemoRow], methods: list[str]) -> list[Series]:
    """One panel's lines: (legend label, layer-averaged visual tokens, accuracy in %) per method, by tokens."""
    labels = legend_labels(methods)
    lines = []
    for method in methods:
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.visual_layer_avg)
        lines.append((labels[method], [r.visual_layer_avg for r in mine], [100 * r.accuracy for r in mine]))
    return lines


def plot_accuracy(rows: list[DemoRow], path: Path, meta: dict | None = None) -> Path:
    """Write `accuracy_figure` (rows[0] = the unpruned model) as a PNG to `path`; returns `path`."""
    plt = pyplot()
    fig = accuracy_figure(rows, meta or {})
    save_figure(fig, path)
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
    rows: list[DemoRow],
    samples: list[Sample],
    grids: list[tuple[int, int] | None],
    path: Path,
    meta: dict | None = None,
) -> Path | None:
    """A grid of cells, PICTURE_COLUMNS wide, one per method at one budget (`pictured_rows`, the unpruned
    model first), each cell the pictured questions' images as a small mosaic (numbered in the unpruned
    cell) with dropped tokens' cells dimmed, the method's name above; a header names the budget, the model
    and the questions. Saved as a palette PNG (`save_quantised`).

    Questions whose tokens form no plain grid (grids[j] is None) are left out; None (nothing written)
    when no question has one."""
    columns = [(j, sample, grid) for j, (sample, grid) in enumerate(zip(samples, grids)) if grid is not None]
    if not columns:
        return None
    shown = pictured_rows(rows)
    cells = [cell_mosaic(row, columns, numbered=i == 0) for i, row in enumerate(shown)]
    names = ["unpruned (all tokens)"] + [row.method for row in shown[1:]]
    budget = fraction_text(shown[-1].budget) if len(shown) > 1 else "all tokens"
    model = (meta or {}).get("model", "model")
    title = f"{model}: visual tokens kept at {budget} (dropped ones dimmed), one cell per method"
    questions = [f"{k + 1}: {s.question} \u2192 {s.answer}" for k, (_, s, _) in enumerate(columns)]
    save_quantised(compose(cells, names, title, questions), path)
    return path


def cell_mosaic(
    row: DemoRow, columns: list[tuple[int, Sample, tuple[int, int]]], numbered: bool = False
) -> np.ndarray:
    """(H, W, 3) uint8: the questions' images (each resized to TILE x TILE) with the row's dropped tokens
    dimmed, MOSAIC_COLUMNS wide in question order with GAP white pixels between them; `numbered` marks
    each image's top-left corner with its question's number."""
    from PIL import Image, ImageDraw

    tiles = []
    for k, (j, sample, grid) in enumerate(columns):
        tile = Image.fromarray(dimmed(sample.image, row.kept[j] if j < len(row.kept) else [], grid))
        if tile.size != (TILE, TILE):
            tile = tile.resize((TILE, TILE), Image.Resampling.BILINEAR)
        if numbered:
            draw = ImageDraw.Draw(tile)
            draw.rectangle((0, 0, BADGE - 1, BADGE - 1), fill="black")
            draw.text(
                (BADGE // 2, BADGE // 2), str(k + 1), fill="white", font=font(BADGE - 4, True), anchor="mm"
            )
        tiles.append(np.asarray(tile))
    return mosaic(tiles, min(MOSAIC_COLUMNS, len(tiles)), GAP)


def mosaic(tiles: list[np.ndarray], columns: int, gap: int) -> np.ndarray:
    """(rows*h + (rows-1)*gap, columns*w + (columns-1)*gap, 3) uint8 of equal (h, w, 3) tiles in raster
    order on white; places past the last tile stay white."""
    height, width = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    out = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        top, left = (k // columns) * (height + gap), (k % columns) * (width + gap)
        out[top : top + height, left : left + width] = tile
    return out


def compose(cells: list[np.ndarray], names: list[str], title: str, questions: list[str]):
    """A PIL RGB image: the title (bold), the questions MOSAIC_COLUMNS to a line (as they lie in each
    cell), then the equal-sized (H, W, 3) cells PICTURE_COLUMNS wide (`cell_box`), each under its name in
    bold; as wide as the widest of the cells, the title and the question lines."""
    from PIL import Image, ImageDraw

    shape = cells[0].shape[:2]
    text, bold = font(FONT_SIZE), font(FONT_SIZE, True)
    column = max(text.getlength(q) for q in questions) + 2 * MARGIN  # one question's column, px
    right, bottom = cell_box(len(cells) - 1, len(cells), shape, len(questions))[2:]
    cols = min(PICTURE_COLUMNS, len(cells))
    wide = max(
        MARGIN + cols * (shape[1] + MARGIN),
        MARGIN + MOSAIC_COLUMNS * column,
        2 * MARGIN + bold.getlength(title),
    )
    canvas = Image.new("RGB", (int(wide), bottom + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill="black", font=bold)
    for k, question in enumerate(questions):
        xy = (MARGIN + (k % MOSAIC_COLUMNS) * column, MARGIN + LINE * (1 + k // MOSAIC_COLUMNS))
        draw.text(xy, question, fill="black", font=text)
    for k, (cell, name) in enumerate(zip(cells, names)):
        left, top = cell_box(k, len(cells), shape, len(questions))[:2]
        draw.text((left, top - LABEL), name, fill="black", font=bold)
        canvas.paste(Image.fromarray(cell), (left, top))
    return canvas


def cell_box(index: int, cells: int, shape: tuple[int, int], questions: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in `compose`'s image of the mosaic of cell `index` of `cells` cells of
    `shape` = (H, W) pixels each, below a header listing `questions` questions; its name lies LABEL above."""
    height, width = shape
    cols = min(PICTURE_COLUMNS, cells)
    header = MARGIN + LINE * (1 + -(-questions // MOSAIC_COLUMNS)) + MARGIN
    left = MARGIN + (index % cols) * (width + MARGIN)
    top = header + (index // cols) * (LABEL + height + MARGIN) + LABEL
    return left, top, left + width, top + height


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


def font(size: int, bold: bool = False):
    """matplotlib's DejaVu Sans at `size` px (Pillow's default font where it cannot be loaded)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    path = font_manager.findfont(
        font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
    )
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)
