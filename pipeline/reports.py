"""Reports: confusion plots per result, and the compare table and plot across results.

It reads results through ``pipeline.results`` (which owns their layout): their metrics and
the feature files' provenance copied into them; it only draws and tabulates.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline import results
from pipeline.options import describe
from pipeline.results import ResultRecord
from pipeline.store import FeatureStore

COLUMNS = ["dataset", "backbone", "mode", "head", "validation_accuracy", "test_accuracy",
           "top5_accuracy", "macro_f1", "fit_seconds", "predict_ms_per_image", "feature_width",
           "n_train", "per_class_recall"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="row-normalised")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def feature_labels(features: dict) -> tuple[str, str]:
    """("mobilenet@0.25", "avg[6 layers]"): the words that tell two feature files apart
    (``options.describe``; a fusion joins its files' words with " + ")."""
    if "fused" in features:
        labels = [describe(f) for f in features["fused"]]
        return " + ".join(b for b, _ in labels), " + ".join(m for _, m in labels)
    return describe(features)


def result_title(record: ResultRecord) -> str:
    """A confusion plot's title: dataset, backbone with its width, features, input size, head."""
    features = record.features
    backbone, mode = feature_labels(features)
    size = f" {features['image_size']}px" if features.get("image_size") else ""
    return (f"{features['dataset']} {backbone} {mode}{size} + {record.label}: "
            f"{100 * record.test_accuracy:.2f}%")


def collect_results(results_dir: str | Path, leave_out: set[str] | frozenset = frozenset()
                    ) -> list[dict]:
    """One row per (feature file, head) with a complete result record, but those on the
    feature files (keys) in ``leave_out``."""
    return _rows([r for r in results.collect(results_dir) if not r.feature_keys & set(leave_out)])


def _rows(records: list[ResultRecord]) -> list[dict]:
    rows = []
    for record in records:
        features = record.features
        backbone, mode = feature_labels(features)
        rows.append({
            "dataset": features.get("dataset", "?"), "backbone": backbone, "mode": mode,
            "head": record.label, "validation_accuracy": record.validation_accuracy,
            "test_accuracy": record.test_accuracy, "top5_accuracy": record.top5_accuracy,
            "per_class_recall": "; ".join(f"{c} {v['recall']:.4f}"
                                          for c, v in record.per_class.items()),
            "macro_f1": record.macro_f1, "fit_seconds": record.fit_seconds,
            "predict_ms_per_image": record.predict_ms_per_image,
            "feature_width": features.get("width"), "n_train": record.n_train,
        })
    rows.sort(key=lambda r: (r["dataset"], -r["test_accuracy"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Every result; per dataset, the one a user would pick (best validation accuracy: test
    accuracy is for reporting, never for choosing) is marked **best**."""
    best = _best_per_dataset(rows)
    lines = ["| dataset | backbone | features | head | val acc | test acc | macro-F1 | fit s | "
             "predict ms/img | width | n train |", "|" + "---|" * 11]
    for r in rows:
        mark = " **best**" if id(r) in best else ""
        val = r.get("validation_accuracy")
        lines.append(f"| {r['dataset']} | {r['backbone']} | {r['mode']} | {r['head']} | "
                     f"{'-' if val is None else f'{100 * val:.2f}%'} | "
                     f"{100 * r['test_accuracy']:.2f}%{mark} | {100 * r['macro_f1']:.2f}% | "
                     f"{r['fit_seconds']:.1f} | {r['predict_ms_per_image']:.3f} | "
                     f"{r['feature_width']} | {r['n_train']} |")
    return "\n".join(lines) + "\n"


def _best_per_dataset(rows: list[dict]) -> set[int]:
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("validation_accuracy") is None:
            continue
        if (r["dataset"] not in best
                or r["validation_accuracy"] > best[r["dataset"]]["validation_accuracy"]):
            best[r["dataset"]] = r
    return {id(r) for r in best.values()}


def plot_accuracy_vs_cost(rows: list[dict], path: Path) -> None:
    """Test accuracy against head fit time, one panel per dataset. Marker and colour say the
    head, a number the features: the key under each panel spells the features out (best
    first), so long names never cover points. A ring marks the result the table marks best
    (chosen on validation accuracy)."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    datasets = sorted({r["dataset"] for r in rows})
    heads = sorted({r["head"] for r in rows})
    markers = dict(zip(heads, "osD^v<>pP*hX"))
    colors = {h: plt.get_cmap("tab10")(i % 10) for i, h in enumerate(heads)}
    best = _best_per_dataset(rows)
    keys = {d: _feature_numbers([r for r in rows if r["dataset"] == d]) for d in datasets}
    line = 0.16  # inches per line of a key
    heights = [h for d in datasets for h in (3.4, 0.15 + line * len(keys[d]))]
    fig, axes = plt.subplots(2 * len(datasets), 1, figsize=(9, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for i, dataset in enumerate(datasets):
        ax, key_ax = axes[2 * i, 0], axes[2 * i + 1, 0]
        points = [r for r in rows if r["dataset"] == dataset]
        for r in points:
            xy = (max(r["fit_seconds"], 1e-3), 100 * r["test_accuracy"])
            ax.scatter(*xy, marker=markers[r["head"]], color=colors[r["head"]], s=50, alpha=0.8,
                       label=r["head"])
            if id(r) in best:
                ax.scatter(*xy, marker="o", s=170, facecolors="none", edgecolors="black",
                           linewidths=1.0, label="best on validation")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # "2x10^-1 3x10^-1 ..." collide
        ax.margins(x=0.1, y=0.08)
        numbers = keys[dataset]
        _label_without_overlap(ax, points, [str(numbers[(r["backbone"], r["mode"])]) for r in points])
        ax.set_xlabel("head fit time (s, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        by_label = dict(zip(labels, handles))
        order = [h for h in [*heads, "best on validation"] if h in by_label]  # alike in panels
        ax.legend([by_label[h] for h in order], order, fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1), borderaxespad=0)
        key_ax.axis("off")
        key_ax.text(0, 1, "\n".join(f"{n:>2}  {_spelled_out(*k)}" for k, n in numbers.items()),
                    transform=key_ax.transAxes, va="top", ha="left", fontsize=7,
                    family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _feature_numbers(points: list[dict]) -> dict[tuple[str, str], int]:
    """1, 2, ... for each (backbone, features) of a dataset, by its best test accuracy."""
    best: dict[tuple[str, str], float] = {}
    for r in points:
        key = (r["backbone"], r["mode"])
        best[key] = max(best.get(key, 0.0), r["test_accuracy"])
    return {key: n for n, key in enumerate(sorted(best, key=lambda k: -best[k]), start=1)}


def _spelled_out(backbone: str, mode: str) -> str:
    """"a@0.25 avg + b@0.35 max" for a fusion (its row says "a@0.25 + b@0.35", "avg + max")."""
    backbones, modes = backbone.split(" + "), mode.split(" + ")
    if len(backbones) != len(modes):
        return f"{backbone} {mode}"
    return " + ".join(f"{b} {m}" for b, m in zip(backbones, modes))


def _label_without_overlap(ax, points: list[dict], labels: list[str], fontsize: float = 7) -> None:
    """Label each point with its label; one that would cover an earlier one moves down
    (greedy, in display space, best accuracy first) and gets a thin line back to its point."""
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel transforms are final
    scale = ax.figure.dpi / 72
    height, char = (fontsize + 2) * scale, 0.6 * fontsize * scale
    placed: list[tuple[float, float, float, float]] = []
    for r, label in sorted(zip(points, labels), key=lambda p: -p[0]["test_accuracy"]):
        xy = (max(r["fit_seconds"], 1e-3), 100 * r["test_accuracy"])
        px, py = ax.transData.transform(xy)
        x0, x1, y = px + 7 * scale, px + 7 * scale + char * len(label), py + 2
        while any(x0 < b[1] and b[0] < x1 and y < b[3] and b[2] < y + height for b in placed):
            y -= height
        placed.append((x0, x1, y, y + height))
        moved = abs(y - (py + 2)) > 1
        ax.annotate(label, xy, xytext=(7, (y - py) / scale), textcoords="offset points",
                    fontsize=fontsize, va="bottom",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "alpha": 0.5} if moved else None)


def compare(results_dir: str | Path = results.DEFAULT_RESULTS_DIR, *, out=print,
            cache_dir: str | Path | None = None) -> list[dict]:
    """Print the table (best per dataset marked) and write compare.csv/.md/.png. With the
    feature cache (``cache_dir``), results on superseded feature files (older versions of
    the same data) are left out, and said so."""
    results_dir = Path(results_dir)
    superseded = FeatureStore(cache_dir).superseded_keys() if cache_dir else set()
    records = results.collect(results_dir)  # read once
    rows = _rows([r for r in records if not r.feature_keys & superseded])
    left_out = len(records) - len(rows)
    if left_out:
        out(f"left out {left_out} result(s) on feature files of older data (superseded; "
            "`python -m pipeline ls` marks them, `python -m pipeline gc` removes them)")
    if not rows:
        out(f"no results under {results_dir}/ yet; train heads first (make heads)")
        return rows
    with open(results_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows)
    (results_dir / "compare.md").write_text(table)
    plot_accuracy_vs_cost(rows, results_dir / "compare.png")
    out(table.rstrip())
    out(f"wrote {results_dir}/compare.csv, compare.md, compare.png")
    return rows
