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
    ("peak_prefill_bytes_median", "peak MiB", "{:.0f}", 1 / 2**20),
    ("kv_cache_bytes_median", "KV MiB", "{:.1f}", 1 / 2**20),
    ("scoring_s_median", "scoring ms", "{:.2f}", 1e3),
]


def markdown_table(rows: list[dict]) -> str:
    """One line per setting; medians over repeats."""
    header = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            key, fmt = column[0], column[2]
            value = row.get(key)
            if value is None:
                cells.append("—")
                continue
            scale = column[3] if len(column) > 3 else 1
            cells.append(fmt.format(value * scale) if isinstance(value, (int, float)) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> list[str]:
    """The performance targets the harness reports (never asserts), one line each with PASS/MISS.

    * pre-LLM methods: realised prefill speed-up >= 90% of the FLOPs-predicted one;
    * every method: scoring time <= 3% of its pruned prefill;
    * a method also run the reference codes' way (eager + output_attentions): the in-place setting is
      >= 1.3x faster in prefill and uses less peak prefill memory.
    """
    from tokprune.methods import LLMMethod, make_method

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

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
                memory = inplace["peak_prefill_bytes_median"] < row["peak_prefill_bytes_median"]
                lines.append(
                    f"{verdict(faster >= 1.3 and memory)}  {inplace['setting']}: in-place vs eager scoring "
                    f"{faster:.2f}x faster (>= 1.3), peak prefill memory "
                    f"{inplace['peak_prefill_bytes_median'] / 2**20:.0f} vs {row['peak_prefill_bytes_median'] / 2**20:.0f} MiB"
                )
    return lines


def write_results(rows: list[dict], meta: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json (meta + rows), results.csv (scalar columns), results.md, and plots (if matplotlib)."""
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
    paths.update(plot(rows, out))
    return paths


def plot(rows: list[dict], out: Path) -> dict[str, Path]:
    """Prefill speed-up and prefill FLOPs against visual tokens entering the LLM, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] != "baseline" and row.get("scoring") == "inplace":
            by_method.setdefault(row["method"], []).append(row)
    base = next((r for r in rows if r["method"] == "baseline"), None)
    figures = {}
    for key, ylabel, name in (
        ("prefill_speedup", "prefill speed-up vs unpruned (×)", "prefill_speedup.png"),
        ("flops_prefill", "prefill TFLOPs", "flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for method, points in sorted(by_method.items()):
            points = sorted(points, key=lambda r: r["visual_tokens_layer_averaged"])
            xs = [p["visual_tokens_layer_averaged"] for p in points]
            ys = [p.get(key) or 0.0 for p in points]
            scale = 1e-12 if key == "flops_prefill" else 1.0
            ax.plot(xs, [y * scale for y in ys], marker="o", label=method)
        if base is not None and key in base:
            value = base[key] * (1e-12 if key == "flops_prefill" else 1.0)
            ax.axhline(value, color="grey", linestyle="--", label="unpruned")
        ax.set_xlabel("visual tokens per image (layer-averaged)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        figures[key] = path
    return figures
