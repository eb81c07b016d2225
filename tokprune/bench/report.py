"""Writing benchmark results: JSON, CSV, a markdown table, and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = [
    ("setting", "setting", "{}"),
    ("visual_tokens_into_llm", "vis→LLM", "{:.0f}"),
    ("visual_tokens_layer_averaged", "vis avg/layer", "{:.1f}"),
    ("prefill_s_median", "prefill ms", "{:.1f}", 1e3),
    ("prefill_speedup", "prefill ×", "{:.2f}"),
    ("flops_predicted_speedup", "FLOPs ×", "{:.2f}"),
    ("realised_over_predicted", "real/pred", "{:.2f}"),
    ("decode_tokens_per_s_median", "decode tok/s", "{:.1f}"),
    ("e2e_s_median", "e2e ms", "{:.1f}", 1e3),
    ("flops_prefill", "TFLOPs", "{:.3f}", 1e-12),
    ("peak_prefill_rise_bytes_median", "peak rise MiB", "{:.0f}", 1 / 2**20),
    ("peak_prefill_absolute_bytes_median", "peak abs MiB", "{:.0f}", 1 / 2**20),
    ("kv_cache_bytes_median", "KV MiB", "{:.1f}", 1 / 2**20),
    ("scoring_s_median", "scoring ms", "{:.2f}", 1e3),
]


# results written before the peak rise had its own name: new key -> the key that then held the value
FORMER_NAMES = {
    f"peak_{block}_rise_bytes_{stat}": f"peak_{block}_bytes_{stat}"
    for block in ("prefill", "e2e")
    for stat in ("median", "min", "max")
}


def with_current_names(row: dict) -> dict:
    """A copy of a result row with every `FORMER_NAMES` value also under its current name (the former
    key stays, for readers not yet moved); rows already carrying the current names come back equal."""
    out = dict(row)
    for key, former in FORMER_NAMES.items():
        if key not in out and former in out:
            out[key] = out[former]
    return out


# columns a table leaves out where no row has them: results recorded before the absolute peak was
OPTIONAL_COLUMNS = {"peak_prefill_absolute_bytes_median"}


def markdown_table(rows: list[dict]) -> str:
    """One line per setting; medians over repeats ("—" where a row has no value; an OPTIONAL_COLUMNS
    column only where some row has one)."""
    rows = [with_current_names(row) for row in rows]
    columns = [
        c for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(r.get(c[0]) is not None for r in rows)
    ]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(table_cell(row.get(c[0]), c) for c in columns) + " |")
    return "\n".join(lines)


def table_cell(value, column: tuple) -> str:
    """One value as its COLUMNS entry (key, header, format[, scale]) writes it; "—" for None."""
    if value is None:
        return "—"
    scale = column[3] if len(column) > 3 else 1
    return column[2].format(value * scale) if isinstance(value, (int, float)) else str(value)


RISE = "peak_prefill_rise_bytes_median"


def target_checks(rows: list[dict]) -> list[str]:
    """The performance targets the harness reports (never asserts), one line each with PASS/MISS.

    * pre-LLM methods: realised prefill speed-up >= 90% of the FLOPs-predicted one;
    * every method: scoring time <= 3% of its pruned prefill;
    * a method also run the reference codes' way (eager + output_attentions): the in-place setting is
      >= 1.3x faster in prefill and its peak prefill memory rises less.
    """
    from tokprune.methods import LLMMethod, make_method

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    rows = [with_current_names(row) for row in rows]
    lines = []
    for row in rows:
        if row["method"] == "baseline" or "prefill_speedup" not in row:
            continue
        label = row["setting"]
        if row["scoring"] == "inplace" and not isinstance(make_method(row["method"], {}), LLMMethod):
            ratio = row["realised_over_predicted"]
            lines.append(
                f"{verdict(ratio >= 0.9)}  {label}: realised/predicted speed-up {ratio:.2f} (>= 0.90)"
            )
        share = row["scoring_share_of_prefill"]
        lines.append(f"{verdict(share <= 0.03)}  {label}: scoring {100 * share:.2f}% of prefill (<= 3%)")
        if row["scoring"] == "eager":
            inplace = next(
                (r for r in rows if r["scoring"] == "inplace" and r["setting"] == label.split(" [")[0]), None
            )
            if inplace is not None:
                faster = row["prefill_s_median"] / inplace["prefill_s_median"]
                ours, theirs = inplace[RISE], row[RISE]
                lines.append(
                    f"{verdict(faster >= 1.3 and ours < theirs)}  {inplace['setting']}: in-place vs eager "
                    f"scoring {faster:.2f}x faster (>= 1.3), peak prefill rise "
                    f"{ours / 2**20:.0f} vs {theirs / 2**20:.0f} MiB"
                )
    return lines


def write_results(rows: list[dict], meta: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json (meta + rows), results.csv (scalar columns), results.md, and plots (if matplotlib).
    Rows are written with the current metric names (`with_current_names`)."""
    rows = [with_current_names(row) for row in rows]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str))
    scalar_keys = sorted(
        {k for row in rows for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
    )
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    checks = "\n".join(f"    {line}" for line in target_checks(rows))
    paths["markdown"].write_text(
        f"# tokprune bench\n\n{header}\n\n{markdown_table(rows)}\n\nTargets:\n\n{checks}\n"
    )
    paths.update(plot(rows, out, meta))
    return paths


# ------------------------------------------------------------------------------- plots: small multiples
Series = tuple[str, list[float], list[float]]  # (legend label, x values, y values), one line
PANEL_ORDER = (
    "[CLS] / ViT attention", "[CLS] attention + merge", "diversity", "other, before the LLM",
    "before + in the LLM", "in the LLM", "baselines",
)  # fmt: skip
# one line's look in a panel: colour, marker, line style (a panel holds at most a handful of lines)
STYLES = (
    ("tab:blue", "o", "-"), ("tab:orange", "s", "--"), ("tab:green", "^", "-."), ("tab:red", "D", ":"),
    ("tab:purple", "v", "-"), ("tab:brown", "P", "--"), ("tab:pink", "X", "-."), ("tab:olive", "*", ":"),
)  # fmt: skip
REFERENCE_COLOR = "black"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (ImportError where matplotlib is missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_quantised(image, path: Path, colors: int = 256) -> Path:
    """Save a PIL RGB image as an optimised palette PNG of `colors` colours (max-coverage palette, no
    dithering: flat areas stay flat and compress; on the demo's picture no channel moves by more than about
    10 of 255, where median cut tints grey objects pink); returns `path`."""
    from PIL import Image

    palette = image.quantize(colors, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)
    return path


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure as a palette PNG (`save_quantised`: a third of the RGBA file, the same look);
    a plain RGBA PNG where Pillow is missing. Returns `path`."""
    import io

    try:
        from PIL import Image
    except ImportError:
        fig.savefig(path, dpi=dpi)
        return path
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return save_quantised(Image.open(buffer).convert("RGB"), path)


def panel_of(entry: dict) -> str:
    """The panel (one of PANEL_ORDER) a `tokprune.methods.catalogue()` entry is drawn in: baselines
    apart, then by where the method acts, then, before the LLM, by the kind of score its family names."""
    family, acts = entry["family"], entry["acts"]
    if family == "baseline":
        return "baselines"
    if acts != "before LLM":
        return "in the LLM" if acts == "in LLM" else "before + in the LLM"
    if "attention" in family:
        return "[CLS] attention + merge" if "merge" in family else "[CLS] / ViT attention"
    return "diversity" if "diversity" in family else "other, before the LLM"


def method_panels(methods: list[str]) -> dict[str, list[str]]:
    """{panel title: its methods in the order given}, panels in PANEL_ORDER, empty ones left out; a name
    the registry does not know goes to "other, before the LLM"."""
    from tokprune.methods import catalogue

    entries = {e["name"]: e for e in catalogue()}
    panels: dict[str, list[str]] = {title: [] for title in PANEL_ORDER}
    for method in methods:
        entry = entries.get(method)
        panels[panel_of(entry) if entry else "other, before the LLM"].append(method)
    return {title: members for title, members in panels.items() if members}


def legend_labels(methods: list[str]) -> dict[str, str]:
    """{method: legend label} for one panel: 'name (family)' where the panel mixes families (the family
    cut before any parenthesis: 'fopru (ViT attention)'), the bare name where all share one."""
    from tokprune.methods import catalogue

    families = {e["name"]: e["family"].split(" (")[0] for e in catalogue()}
    mixed = len({families.get(m, "") for m in methods}) > 1
    return {m: f"{m} ({families[m]})" if mixed and families.get(m) else m for m in methods}


def padded(values: list[float], share: float = 0.07, floor: float | None = None) -> tuple[float, float]:
    """(low, high) axis limits holding every value with `share` of their span to spare on each side;
    `floor` (0 for token counts) is always inside. Equal values get +-10% of the value (at least +-1)."""
    low, high = min(values), max(values)
    if floor is not None:
        low = min(low, floor)
    if high == low:
        return low - max(abs(low) * 0.1, 1.0), high + max(abs(high) * 0.1, 1.0)
    return low - share * (high - low), high + share * (high - low)


def small_multiples(
    panels: dict[str, list[Series]],
    reference: tuple[float, float, str] | None,
    labels: tuple[str, str, str],
    columns: int = 4,
):
    """One panel per entry of `panels` (shared axes), each with its few lines and the `reference`
    (x, y, legend label: the unpruned model) as a dashed horizontal line and a black star. `labels` =
    (x label, y label, figure title). Axis limits hold every point and the reference. No panels: one
    panel with the reference alone. Returns the figure."""
    plt = pyplot()
    panels = panels or {"no pruned setting": []}
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(3.6 * cols, 8.0), 3.2 * rows + 1.3), sharex=True, sharey=True, squeeze=False
    )
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        draw_panel(ax, title, lines, reference)
    hide_unused(axes, len(panels))
    set_limits(axes[0][0], list(panels.values()), reference)
    xlabel, ylabel, title = labels
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(xlabel, fontsize=10)
    fig.supylabel(ylabel, fontsize=10)
    fig.tight_layout()
    return fig


def set_limits(ax, panels: list[list[Series]], reference: tuple[float, float, str] | None) -> None:
    """Limits of `ax` (shared by every panel) from every line's points and the reference point (`padded`;
    x from 0)."""
    xs = [x for lines in panels for _, points, _ in lines for x in points]
    ys = [y for lines in panels for _, _, points in lines for y in points]
    if reference is not None:
        xs, ys = xs + [reference[0]], ys + [reference[1]]
    ax.set_xlim(*padded(xs or [0.0], floor=0.0))
    ax.set_ylim(*padded(ys or [0.0]))


def draw_panel(ax, title: str, lines: list[Series], reference: tuple[float, float, str] | None) -> None:
    """One panel: each line in its own colour, marker and dash; markers shrink line by line, so that a
    line lying exactly on an earlier one still shows its marker inside the earlier, bigger one."""
    if reference is not None:
        x, y, label = reference
        ax.axhline(y, color=REFERENCE_COLOR, linestyle="--", linewidth=1, alpha=0.6)
        ax.plot(
            [x], [y], marker="*", markersize=11, color=REFERENCE_COLOR, linestyle="none", label=label,
            zorder=10,  # above the legend (zorder 5): a legend in the corner never hides the reference
        )  # fmt: skip
    for i, (label, xs, ys) in enumerate(lines):
        color, marker, dash = STYLES[i % len(STYLES)]
        ax.plot(
            xs, ys, color=color, marker=marker, linestyle=dash, linewidth=1.6,
            markersize=max(4.0, 9.0 - 1.2 * i), label=label, zorder=2 + i,
        )  # fmt: skip
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)


def hide_unused(axes, used: int) -> None:
    """Hide the panels past `used` and give the panel above each hidden one its x tick labels back."""
    rows, cols = len(axes), len(axes[0])
    for index in range(used, rows * cols):
        row, col = divmod(index, cols)
        axes[row][col].set_visible(False)
        if row > 0:
            axes[row - 1][col].xaxis.set_tick_params(labelbottom=True)


def budgets_text(rows: list[dict]) -> str:
    """The budgets of the pruned rows, smallest first: '64 / 128 / 192 tokens', 'keep 0.5 / 0.25' or both,
    joined by '; '; 'none' where no row is pruned."""
    pruned = [r for r in rows if r["method"] != "baseline"]
    tokens = sorted({r["budget"] for r in pruned if r.get("budget") is not None})
    ratios = sorted({r["keep_ratio"] for r in pruned if r.get("keep_ratio") is not None}, reverse=True)
    parts = [" / ".join(str(t) for t in tokens) + " tokens"] if tokens else []
    parts += ["keep " + " / ".join(f"{r:g}" for r in ratios)] if ratios else []
    return "; ".join(parts) or "none"


def bench_title(what: str, rows: list[dict], meta: dict) -> str:
    """'<what>: <model> (<layers> layers, <attn>, <dtype>, batch <n>, <device>)' over a second line with
    the budgets (`budgets_text`), the scoring and the repeats; keys missing from `meta` are left out."""
    details = [
        f"{meta['layers']} layers" if meta.get("layers") else None,
        meta.get("attn"),
        meta.get("dtype"),
        f"batch {meta['batch_size']}" if meta.get("batch_size") else None,
        meta.get("device"),
    ]
    setting = ", ".join(d for d in details if d)
    repeats = f"; medians over {meta['repeats']} repeat(s)" if meta.get("repeats") else ""
    model = f"{meta.get('model', 'model')}" + (f" ({setting})" if setting else "")
    return f"{what}: {model}\nbudgets {budgets_text(rows)} per image; in-place scoring{repeats}"


BENCH_PLOTS = (  # (row key, y label, figure name, title start, reference legend), {unit}: `plot_unit`
    ("prefill_speedup", "prefill speed-up over unpruned ({unit}, wall time)", "prefill_speedup.png", "prefill speed-up",
     "unpruned (1×)"),
    ("flops_prefill", "prefill {unit} (batch; mul-add = 2)", "flops.png", "prefill FLOPs",
     "unpruned ({value:.3g} {unit})"),
)  # fmt: skip
BENCH_X = "visual tokens per prompt, layer-averaged (tokens)"


def plot_unit(key: str, rows: list[dict]) -> tuple[float, str]:
    """(scale, unit) a plotted row key is drawn in: FLOPs as TFLOPs, or GFLOPs where the largest is under
    0.1 TFLOPs (the toy); speed-ups as ×."""
    if key != "flops_prefill":
        return 1.0, "×"
    largest = max((r[key] for r in rows if r.get(key) is not None), default=0.0)
    return (1e-12, "TFLOPs") if largest >= 1e11 else (1e-9, "GFLOPs")


def plot(rows: list[dict], out: Path, meta: dict | None = None) -> dict[str, Path]:
    """prefill_speedup.png and flops.png (`bench_figure` of each BENCH_PLOTS entry) in `out`:
    {row key: path}; {} where matplotlib is not installed."""
    try:
        plt = pyplot()
    except ImportError:
        return {}
    figures = {}
    for spec in BENCH_PLOTS:
        fig = bench_figure(rows, spec, meta or {})
        save_figure(fig, out / spec[2])
        plt.close(fig)
        figures[spec[0]] = out / spec[2]
    return figures


def bench_figure(rows: list[dict], spec: tuple, meta: dict):
    """One BENCH_PLOTS figure: row[key] in `plot_unit` against layer-averaged visual tokens, one small
    panel per method family (`method_panels`), in-place scoring only, the baseline row in every panel as
    the reference; titled with the model, its setting and the budgets (`bench_title`)."""
    key, ylabel, _, what, reference_label = spec
    scale, unit = plot_unit(key, rows)
    pruned = [r for r in rows if r["method"] != "baseline" and r.get("scoring") == "inplace"]
    panels = method_panels(list(dict.fromkeys(r["method"] for r in pruned)))
    lines = {title: bench_lines(pruned, members, key, scale) for title, members in panels.items()}
    base = next((r for r in rows if r["method"] == "baseline"), None)
    reference = None
    if base is not None and base.get(key) is not None:
        value = base[key] * scale
        reference = (
            base["visual_tokens_layer_averaged"],
            value,
            reference_label.format(value=value, unit=unit),
        )
    labels = (BENCH_X, ylabel.format(unit=unit), bench_title(what, rows, meta))
    return small_multiples(lines, reference, labels)


def bench_lines(rows: list[dict], methods: list[str], key: str, scale: float) -> list[Series]:
    """One panel's lines, one per method: (legend label, layer-averaged visual tokens, row[key] * scale),
    by tokens; rows without `key` (no figure measured) are left out, never drawn as 0."""
    labels = legend_labels(methods)
    lines = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method and r.get(key) is not None]
        points = sorted(mine, key=lambda r: r["visual_tokens_layer_averaged"])
        xs = [p["visual_tokens_layer_averaged"] for p in points]
        lines.append((labels[method], xs, [p[key] * scale for p in points]))
    return lines
