"""The pictures `tokprune demo` and `tokprune bench` write, and the bench's peak-memory names.

Plots: one small panel per method family with a few lines each, the unpruned model inside the axes of
every panel, titles naming the model and the budgets, palette PNGs. The kept-token picture: a compact grid
of named cells, well under 1 MB for every method the toy runs. Memory: the rise above the memory in use at
the start and the absolute peak, under their own names, old results still read.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokprune.bench import report as bench
from tokprune.bench.measure import PeakMemory, return_freed_memory_to_os
from tokprune.methods import catalogue
from tokprune.toy import report
from tokprune.toy.demo import DemoRow
from tokprune.toy.task import generate

TOY_METHODS = [e["name"] for e in catalogue() if "AnyRes" not in e["family"]]  # what the toy demo runs
KEEP = (0.5, 0.25, 0.125)
N_TOKENS = 196  # the toy's 14 x 14 grid
GRIDS = [(14, 14)] * 4


@pytest.fixture(scope="module")
def demo_rows() -> list[DemoRow]:
    """The unpruned row (95% on 20 questions, 196 tokens, above and right of every method's point), then
    every toy method at keep 1/2, 1/4, 1/8 with made-up accuracies; fopru and hiprune alike, as measured
    on 2026-12-02, where one line hid the other."""
    rng = np.random.default_rng(0)
    rows = [DemoRow("unpruned", "all", correct=19, total=20, visual_layer_avg=N_TOKENS)]
    rows[0].kept = [list(range(N_TOKENS))] * 4
    for method in TOY_METHODS:
        scores = [18, 17, 15] if method in ("fopru", "hiprune") else rng.integers(8, 19, size=3).tolist()
        for ratio, correct in zip(KEEP, scores):
            row = DemoRow(method, f"keep {ratio:g}", correct=correct, total=20)
            row.visual_layer_avg = N_TOKENS * ratio
            row.kept = [sorted(rng.choice(N_TOKENS, int(N_TOKENS * ratio), replace=False).tolist())] * 4
            rows.append(row)
    return rows


def visible_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def inside(ax, x: float, y: float) -> bool:
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    return x0 < x < x1 and y0 < y < y1


# ------------------------------------------------------------------------------------ family panels
def test_every_method_lands_in_one_small_panel_and_fopru_apart_from_hiprune():
    names = [e["name"] for e in catalogue()]
    panels = bench.method_panels(names)
    placed = [m for members in panels.values() for m in members]
    assert sorted(placed) == sorted(names)
    assert max(len(members) for members in panels.values()) <= 5, panels
    panel_of = {m: title for title, members in panels.items() for m in members}
    assert panel_of["fopru"] != panel_of["hiprune"]
    assert panel_of["fastv"] == panel_of["pdrop"] == "in the LLM"
    assert panel_of["pool"] == panel_of["random"] == "baselines"
    assert list(bench.method_panels(["unknown_method"])) == ["other, before the LLM"]


def test_legend_names_the_family_only_where_a_panel_mixes_them():
    assert bench.legend_labels(["fastervlm", "fopru"]) == {
        "fastervlm": "fastervlm ([CLS] attention)", "fopru": "fopru (ViT attention)",
    }  # fmt: skip
    assert bench.legend_labels(["prumerge", "visionzip"]) == {
        "prumerge": "prumerge",
        "visionzip": "visionzip",
    }


def test_fraction_text():
    assert [report.fraction_text(f"keep {r:g}") for r in KEEP] == ["keep 1/2", "keep 1/4", "keep 1/8"]
    assert report.fraction_text("keep 0.3") == "keep 0.3" and report.fraction_text("64 tokens") == "64 tokens"


# ------------------------------------------------------------------------------------ demo accuracy plot
def test_accuracy_plot_is_titled_small_multiples_holding_the_unpruned_point(demo_rows):
    fig = report.accuracy_figure(demo_rows, {"model": "toy", "questions": 20})
    panels = bench.method_panels(TOY_METHODS)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == list(panels)
    title = fig.get_suptitle()
    assert "toy" in title and "20 held-out questions" in title and "keep 1/2, keep 1/4, keep 1/8" in title
    assert fig.get_supylabel() == "accuracy (%)" and "visual tokens" in fig.get_supxlabel()
    for ax, members in zip(axes, panels.values()):
        star, *lines = ax.get_lines()[1:]  # [0] is the dashed reference line
        assert tuple(star.get_xydata()[0]) == (N_TOKENS, 95.0) and inside(ax, N_TOKENS, 95.0)
        assert [line.get_label() for line in lines] == list(bench.legend_labels(members).values())
        looks = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
        assert len(looks) == len(lines)  # every line of a panel its own colour, marker and dash
        assert all(inside(ax, x, y) for line in lines for x, y in line.get_xydata())
    bench.pyplot().close(fig)


def test_accuracy_plot_file_is_a_small_palette_png(demo_rows, tmp_path):
    path = report.plot_accuracy(demo_rows, tmp_path / "accuracy.png", {"model": "toy"})
    image = Image.open(path)
    assert image.mode == "P" and path.stat().st_size < 150_000 and image.size[0] <= 1600


# ------------------------------------------------------------------------------------ kept-token picture
def test_kept_picture_is_a_compact_grid_of_named_cells(demo_rows, tmp_path):
    samples = generate(4, 11)
    path = report.picture_kept(demo_rows, samples, GRIDS, tmp_path / "kept.png", {"model": "toy"})
    shown = report.pictured_rows(demo_rows)
    assert len(shown) == 1 + len(TOY_METHODS) and {r.budget for r in shown[1:]} == {"keep 0.25"}
    image = Image.open(path)
    width, height = image.size
    assert image.mode == "P" and path.stat().st_size < 600_000  # well under 1 MB (was 4.5 MB)
    assert width <= 1300 and height <= 1.2 * width  # a grid, not a 836 x 4180 strip
    columns = [(j, s, g) for j, (s, g) in enumerate(zip(samples, GRIDS))]
    shape = report.cell_mosaic(shown[0], columns).shape[:2]
    assert (width - report.MARGIN) // (shape[1] + report.MARGIN) == report.PICTURE_COLUMNS == 5
    pixels = np.asarray(image.convert("RGB")).astype(int)
    for index in (0, 7, len(shown) - 1):  # first, inner and last cell: its mosaic, its name above it
        left, top, right, bottom = report.cell_box(index, len(shown), shape, len(samples))
        expected = report.cell_mosaic(shown[index], columns, numbered=index == 0).astype(int)
        assert np.abs(pixels[top:bottom, left:right] - expected).max() <= 16  # palette keeps colours
        label = pixels[top - report.LABEL : top, left:right]
        assert (label.sum(-1) < 200).sum() > 40  # dark text pixels of the method's name


def test_kept_picture_numbers_the_questions_of_the_unpruned_cell(demo_rows):
    """A badge in the top-left corner of each image of the mosaic, nothing else drawn over."""
    columns = [(j, s, g) for j, (s, g) in enumerate(zip(generate(4, 11), GRIDS))]
    plain = report.cell_mosaic(demo_rows[0], columns)
    changed = (report.cell_mosaic(demo_rows[0], columns, numbered=True) != plain).any(-1)
    badges = np.zeros_like(changed)
    pitch, side = report.TILE + report.GAP, report.BADGE
    for k in range(len(columns)):
        top, left = (k // report.MOSAIC_COLUMNS) * pitch, (k % report.MOSAIC_COLUMNS) * pitch
        badges[top : top + side, left : left + side] = True
        assert changed[top : top + side, left : left + side].mean() > 0.5
    assert not changed[~badges].any()


# ------------------------------------------------------------------------------------ bench plots
def bench_rows() -> list[dict]:
    """A baseline (576 tokens, 1.4 TFLOPs) and three methods at 64 and 128 tokens in place, FastV also
    eager (not plotted)."""
    rows = [dict(method="baseline", setting="baseline", budget=None, keep_ratio=None, scoring="inplace",
                 visual_tokens_layer_averaged=576.0, prefill_speedup=1.0, flops_prefill=1.4e12)]  # fmt: skip
    for method in ("visionzip", "divprune", "fastv"):
        for budget, speed in ((64, 2.0), (128, 1.7)):
            for scoring in ("inplace", "eager") if method == "fastv" else ("inplace",):
                rows.append(dict(
                    method=method, setting=f"{method}@{budget}", budget=budget, keep_ratio=None, scoring=scoring,
                    visual_tokens_layer_averaged=float(budget), prefill_speedup=speed, flops_prefill=0.5e12,
                ))  # fmt: skip
    return rows


META = {"model": "llava-1.5-7b", "layers": 4, "attn": "sdpa", "dtype": "float32", "batch_size": 1,
        "device": "cpu (x86_64)", "repeats": 3}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "unit", "base"), [(bench.BENCH_PLOTS[0], "(×", 1.0), (bench.BENCH_PLOTS[1], "TFLOPs (", 1.4)]
)
def test_bench_plots_name_model_budgets_units_and_hold_the_baseline(spec, unit, base):
    fig = bench.bench_figure(bench_rows(), spec, META)
    title = fig.get_suptitle()
    assert "llava-1.5-7b (4 layers, sdpa, float32, batch 1, cpu (x86_64))" in title
    assert "budgets 64 / 128 tokens per image" in title and "in-place scoring" in title
    assert unit in fig.get_supylabel() and "(tokens)" in fig.get_supxlabel()
    axes = visible_axes(fig)
    assert len(axes) == len(bench.method_panels(["visionzip", "divprune", "fastv"]))
    for ax in axes:
        star, *lines = ax.get_lines()[1:]
        assert tuple(star.get_xydata()[0]) == pytest.approx((576.0, base)) and inside(ax, 576.0, base)
        assert all(len(line.get_xydata()) == 2 for line in lines)  # FastV's eager rows left out
    bench.pyplot().close(fig)


def test_flops_are_drawn_in_gflops_where_tera_would_read_0_001():
    toy = [{"method": "baseline", "flops_prefill": 8.5e8}, {"method": "fastv", "flops_prefill": None}]
    assert bench.plot_unit("flops_prefill", toy) == (1e-9, "GFLOPs")
    assert bench.plot_unit("flops_prefill", bench_rows()) == (1e-12, "TFLOPs")
    assert bench.plot_unit("prefill_speedup", bench_rows()) == (1.0, "×")


def test_budgets_text_lists_tokens_and_ratios():
    rows = [{"method": "a", "budget": 128}, {"method": "a", "budget": 64}, {"method": "b", "keep_ratio": 0.25},
            {"method": "b", "keep_ratio": 0.5}, {"method": "baseline", "budget": None}]  # fmt: skip
    assert bench.budgets_text(rows) == "64 / 128 tokens; keep 0.5 / 0.25"
    assert bench.budgets_text(rows[-1:]) == "none"


# ------------------------------------------------------------------------------------ peak memory names
def test_peak_memory_records_the_rise_and_the_absolute_peak():
    return_freed_memory_to_os()
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64, 1024, 1024)  # 256 MiB
        del block
    assert memory.rise_bytes > 200 * 2**20 and memory.peak_bytes == memory.rise_bytes
    assert memory.absolute_bytes == memory.start_bytes + memory.rise_bytes
    assert memory.start_bytes > 50 * 2**20  # the process RSS: torch, Python, the libraries
    assert memory.fields("prefill") == {
        "peak_prefill_rise_bytes": memory.rise_bytes,
        "peak_prefill_absolute_bytes": memory.absolute_bytes,
        "peak_prefill_bytes": memory.rise_bytes,
    }


def memory_rows(current: bool) -> list[dict]:
    """A baseline, FastV in place and eager; current=False: only the former key (results before the rename)."""
    rows = []
    for setting, scoring, rise in (("baseline", "inplace", 300), ("fastv@64", "inplace", 175),
                                   ("fastv@64 [eager+output_attentions]", "eager", 757)):  # fmt: skip
        row = dict(setting=setting, method=setting.split("@")[0], scoring=scoring, prefill_s_median=0.5,
                   prefill_speedup=1.0, realised_over_predicted=1.0, scoring_share_of_prefill=0.01,
                   scoring_s_median=0.001, visual_tokens_layer_averaged=64.0)  # fmt: skip
        if scoring == "eager":
            row["prefill_s_median"] = 0.8
        if current:
            row.update(
                peak_prefill_rise_bytes_median=rise * 2**20, peak_prefill_absolute_bytes_median=9000 * 2**20
            )
        else:
            row["peak_prefill_bytes_median"] = rise * 2**20
        rows.append(row)
    return rows


@pytest.mark.parametrize("current", [True, False])
def test_report_names_the_rise_and_reads_old_results(current, tmp_path):
    rows = memory_rows(current)
    table = bench.markdown_table(rows).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [c.strip() for c in table[3].strip("|").split("|")]  # the FastV in-place line
    assert cells[header.index("peak rise MiB")] == "175"
    if current:
        assert cells[header.index("peak abs MiB")] == "9000"
    else:  # recorded before the absolute peak was: no column of dashes
        assert "peak abs MiB" not in header and len(cells) == len(header)
    checks = [line for line in bench.target_checks(rows) if "in-place vs eager" in line]
    assert len(checks) == 1 and "peak prefill rise 175 vs 757 MiB" in checks[0]
    results = json.loads(bench.write_results(rows, {"model": "tiny"}, tmp_path)["json"].read_text())[
        "results"
    ]
    assert results[1]["peak_prefill_rise_bytes_median"] == 175 * 2**20
    assert ("peak_prefill_bytes_median" in results[1]) is not current  # a former key stays, none is made up
