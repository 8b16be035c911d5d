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
           "n_train", "per_class_recall", "result"]


def _figure(**kw):
    """A figure of its own, outside pyplot's global figure registry: heads trained side by
    side (``training.run_heads``) draw their plots at the same time, in threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)  # drawn by Agg, as pyplot's "Agg" backend drew it
    return fig


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig = _figure(figsize=(size + 1, size))
    ax = fig.subplots()
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


MISTAKE_COLUMNS = ["row", "id", "true", "predicted", "confidence"]


def write_mistakes(mistakes: list[dict], path: Path) -> None:
    """``mistakes.csv``: one line per misclassified test row, most confident first."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MISTAKE_COLUMNS)
        writer.writeheader()
        writer.writerows(mistakes)


def worst_pairs(mistakes: list[dict], pairs: int = 6, per_pair: int = 6
                ) -> list[tuple[tuple, int, list]]:
    """The class pairs a head confuses most, (true, predicted), each with how many mistakes
    it makes there and its most confident ones (``mistakes`` come most confident first)."""
    by_pair: dict[tuple, list] = {}
    for m in mistakes:
        by_pair.setdefault((m["true"], m["predicted"]), []).append(m)
    ranked = sorted(by_pair.items(), key=lambda item: (-len(item[1]), item[0]))[:pairs]
    return [(pair, len(rows), rows[:per_pair]) for pair, rows in ranked]


def plot_mistakes(mistakes: list[dict], source: str, title: str, path: Path, *,
                  pairs: int = 6, per_pair: int = 6) -> str | None:
    """A contact sheet of the most confident mistakes per confused class pair, drawn from
    the original images (``source``: the dataset's absolute spec). Returns why none was drawn
    (no mistakes, no row ids, images gone), or None."""
    from pipeline.datasets import original_images
    from pipeline.errors import PipelineError

    if not mistakes:
        return "no mistakes"
    if any(m["id"] in (None, "") for m in mistakes):
        return "the feature file has no row ids (extracted before rows named their images)"
    chosen = worst_pairs(mistakes, pairs, per_pair)
    shown = [m for _, _, rows in chosen for m in rows]
    try:
        images = original_images(source, "test", [m["id"] for m in shown])
    except PipelineError as exc:
        return f"the images are not readable: {exc}"
    if all(image is None for image in images):
        return f"none of the images is at {source} any more"
    sheet, (h, w, gap) = _contact_sheet(chosen, images, per_pair)
    # One image in one axes: 36 small axes took 0.45 s a sheet to make and 0.3 s to save.
    inches = 1.5 * per_pair, 1.5 * per_pair * sheet.shape[0] / sheet.shape[1]  # the sheet's
    width, height = inches[0] + 1.3, inches[1] + 0.5  # and room for the labels and the title
    fig = _figure(figsize=(width, height))
    ax = fig.add_axes((1.2 / width, 0.1 / height, inches[0] / width, inches[1] / height))
    ax.imshow(sheet, interpolation="nearest")
    ax.set_axis_off()
    for r, ((true, predicted), count, rows) in enumerate(chosen):
        top = r * (h + 2 * gap)
        ax.text(-gap, top + h / 2, f"{true} ->\n{predicted}\n({count})", fontsize=7,
                ha="right", va="center")
        for c, row in enumerate(rows):
            if row["confidence"] is not None:
                ax.text(c * (w + gap) + w / 2, top + h + gap, f"{row['confidence']:.2f}",
                        fontsize=7, ha="center", va="center")
    fig.suptitle(f"{title}: most confident mistakes, true -> predicted (count)", fontsize=9)
    fig.savefig(path, dpi=100)
    return None


def _contact_sheet(chosen: list, images: list, per_pair: int) -> tuple[np.ndarray, tuple]:
    """The images pair by pair as one RGB array: a row per pair, a cell per image (each
    scaled to the largest image's size, nearest pixel), white between, grey where an image
    is gone; and the cell's (height, width, gap)."""
    present = [image for image in images if image is not None]
    h, w = max(i.shape[0] for i in present), max(i.shape[1] for i in present)
    gap = max(h, w) // 8
    sheet = np.full((len(chosen) * (h + 2 * gap), per_pair * (w + gap), 3), 255, np.uint8)
    pictures = iter(images)  # in the order of ``shown``: pair by pair
    for r, (_, _, rows) in enumerate(chosen):
        for c in range(len(rows)):
            image = next(pictures)
            cell = sheet[r * (h + 2 * gap):r * (h + 2 * gap) + h, c * (w + gap):c * (w + gap) + w]
            if image is None:
                cell[:] = 200
                continue
            image = np.atleast_3d(image)  # RGB; a grey one broadcasts
            cell[:] = image[np.arange(h) * image.shape[0] // h][:, np.arange(w) * image.shape[1] // w]
    return sheet, (h, w, gap)


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
    results_dir = Path(results_dir)
    return _rows({f: r for f, r in results.collect_folders(results_dir).items()
                  if not r.feature_keys & set(leave_out)}, results_dir)


def _rows(records: dict[Path, ResultRecord], results_dir: Path) -> list[dict]:
    rows = []
    for folder, record in records.items():
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
            "result": folder.relative_to(results_dir).as_posix(),
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
    from matplotlib.ticker import NullFormatter

    datasets = sorted({r["dataset"] for r in rows})
    heads = sorted({r["head"] for r in rows})
    markers = dict(zip(heads, "osD^v<>pP*hX"))
    colors = {h: _colormap("tab10")(i % 10) for i, h in enumerate(heads)}
    best = _best_per_dataset(rows)
    keys = {d: _feature_numbers([r for r in rows if r["dataset"] == d]) for d in datasets}
    line = 0.16  # inches per line of a key
    heights = [h for d in datasets for h in (3.4, 0.15 + line * len(keys[d]))]
    fig = _figure(figsize=(9, sum(heights)))
    axes = fig.subplots(2 * len(datasets), 1, gridspec_kw={"height_ratios": heights},
                        squeeze=False)
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
    records = results.collect_folders(results_dir)  # read once
    current = {f: r for f, r in records.items() if not r.feature_keys & superseded}
    rows = _rows(current, results_dir)
    left_out = len(records) - len(rows)
    if left_out:
        out(f"left out {left_out} result(s) on feature files of older data (superseded; "
            "`python -m pipeline ls` marks them, `python -m pipeline gc` removes them)")
    if not rows:
        if write_curves(results_dir, current):  # learning curves without a full-data result
            out(f"wrote {results_dir}/curves.csv, curves.png (learning curves only: no head "
                "trained on all rows to compare)")
        else:
            out(f"no results under {results_dir}/ yet; train heads first (make heads)")
        return rows
    with open(results_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows)
    (results_dir / "compare.md").write_text(table)
    plot_accuracy_vs_cost(rows, results_dir / "compare.png")
    curves = write_curves(results_dir, current)
    write_report(rows, current, results_dir, curves=bool(curves))
    out(table.rstrip())
    out(f"wrote {results_dir}/compare.csv, compare.md, compare.png, "
        f"{'curves.csv, curves.png, ' if curves else ''}report.html")
    return rows


# ----------------------------------------------------------------------------- learning curves

CURVE_COLUMNS = ["dataset", "backbone", "mode", "head", "shots", "tries", "mean_test_accuracy",
                 "std_test_accuracy", "mean_n_train", "validation"]


def curve_rows(points: dict[Path, ResultRecord], full: dict[Path, ResultRecord]) -> list[dict]:
    """Per (feature file, head, k): mean and standard deviation of test accuracy over the
    draws, and each curve's full-data result (``shots`` "all") where it was trained."""
    groups: dict[tuple, list[ResultRecord]] = {}
    for record in points.values():
        backbone, mode = feature_labels(record.features)
        key = (record.features.get("dataset", "?"), backbone, mode, record.label, record.shots)
        groups.setdefault(key, []).append(record)
    rows = []
    for (dataset, backbone, mode, head, shots), records in groups.items():
        accuracy = np.array([r.test_accuracy for r in records])
        rows.append({"dataset": dataset, "backbone": backbone, "mode": mode, "head": head,
                     "shots": shots, "tries": len(records),
                     "mean_test_accuracy": float(accuracy.mean()),
                     "std_test_accuracy": float(accuracy.std(ddof=1)) if len(records) > 1 else 0.0,
                     "mean_n_train": float(np.mean([r.n_train for r in records])),
                     "validation": "carved from the draw" if all(
                         "carved" in r.validation for r in records) else "none (fixed setting)"})
    curves = {(r["dataset"], r["backbone"], r["mode"], r["head"]) for r in rows}
    for record in full.values():
        backbone, mode = feature_labels(record.features)
        key = (record.features.get("dataset", "?"), backbone, mode, record.label)
        if key in curves:
            rows.append({**dict(zip(("dataset", "backbone", "mode", "head"), key)), "shots": "all",
                         "tries": 1, "mean_test_accuracy": record.test_accuracy,
                         "std_test_accuracy": 0.0, "mean_n_train": float(record.n_train or 0),
                         "validation": "carved from all training rows"})
    rows.sort(key=lambda r: (r["dataset"], r["backbone"], r["mode"], r["head"],
                             float("inf") if r["shots"] == "all" else r["shots"]))
    return rows


def plot_curves(rows: list[dict], path: Path) -> None:
    """Test accuracy against training images per class (log axis), one panel per dataset, a
    line per (features, head) with a band of one standard deviation over the draws; the
    full-data result, where trained, is the point at the right."""
    datasets = sorted({r["dataset"] for r in rows})
    fig = _figure(figsize=(9, 4.8 * len(datasets)))
    axes = fig.subplots(len(datasets), 1, squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        lines = sorted({(r["backbone"], r["mode"], r["head"]) for r in mine})
        heads = sorted({head for _, _, head in lines})
        features = sorted({(backbone, mode) for backbone, mode, _ in lines})
        n_classes = None
        for line in lines:  # colour: the head; line style: the features
            points = [r for r in mine if (r["backbone"], r["mode"], r["head"]) == line]
            drawn = [r for r in points if r["shots"] != "all"]
            ks = np.array([r["shots"] for r in drawn], dtype=float)
            mean = 100 * np.array([r["mean_test_accuracy"] for r in drawn])
            std = 100 * np.array([r["std_test_accuracy"] for r in drawn])
            color = _colormap("tab10")(heads.index(line[2]) % 10)
            style = ("-", "--", ":", "-.")[features.index(line[:2]) % 4]
            label = line[2] + (f" on {line[0]} {line[1]}" if len(features) > 1 else "")
            ax.plot(ks, mean, marker="o", ls=style, color=color, label=label, ms=4)
            ax.fill_between(ks, mean - std, mean + std, color=color, alpha=0.12, lw=0)
            for r in points:
                if r["shots"] == "all" and drawn:
                    n_classes = n_classes or round(drawn[0]["mean_n_train"] / drawn[0]["shots"])
                    per_class = r["mean_n_train"] / max(n_classes, 1)
                    ax.plot([per_class], [100 * r["mean_test_accuracy"]], "*", color=color, ms=11)
        ax.set_xscale("log")
        ax.set_xlabel("training images per class (log); * = all training images")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: mean over seeded draws, band = one standard deviation", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", ncol=2 if len(lines) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_curves(results_dir: Path, full: dict[Path, ResultRecord]) -> list[dict]:
    """``curves.csv`` and ``curves.png`` of every learning curve under ``results_dir``."""
    rows = curve_rows(results.collect_folders(results_dir, "*/curves/*/*"), full)
    if rows:
        with open(results_dir / "curves.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        plot_curves(rows, results_dir / "curves.png")
    return rows


# ----------------------------------------------------------------------------- the report page

def feature_view(path: Path, out: Path, *, rows: int = 1000, seed: int = 0) -> str | None:
    """``out``: the feature file's test rows in 2-D, coloured by class: PCA, and t-SNE (on at
    most ``rows`` rows), so people can judge by eye whether the classes separate. Returns why
    none was drawn, or None. Kept: drawn again only when missing (its folder is named after
    the file, key included)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from pipeline.errors import PipelineError
    from pipeline.store import FeatureFile

    if out.exists():
        return None
    try:
        with FeatureFile(path) as ff:
            y = ff.labels("test")
            keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:rows])
            X = ff.features("test")[keep].reshape(len(keep), -1).astype(np.float32)
            y, classes = y[keep], ff.classes
    except (PipelineError, OSError) as exc:
        return str(exc)
    if len(X) < 3 or X.shape[1] < 2:
        return f"{len(X)} test row(s) of width {X.shape[1]}: nothing to draw"
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    views = {"PCA": PCA(n_components=2, random_state=seed).fit_transform(X)}
    if len(X) > 30:
        views["t-SNE"] = TSNE(n_components=2, init="pca", random_state=seed,
                              perplexity=min(30.0, (len(X) - 1) / 3)).fit_transform(X)
    fig = _figure(figsize=(5 * len(views) + 1.5, 4.5))
    axes = fig.subplots(1, len(views), squeeze=False)
    cmap = _colormap("tab20" if len(classes) > 10 else "tab10")
    for ax, (name, points) in zip(axes[0], views.items()):
        for c, label in enumerate(classes):
            mine = y == c
            if mine.any():
                ax.scatter(points[mine, 0], points[mine, 1], s=6, alpha=0.7, color=cmap(c % cmap.N),
                           label=label)
        ax.set_title(f"{name} of {len(X):,} test rows", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0, -1].legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return None


def _data_uri(path: Path) -> str | None:
    import base64

    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return None


def _img(path: Path, alt: str, missing: str) -> str:
    from html import escape

    uri = _data_uri(path)
    if uri is None:
        return f'<p class="missing">{escape(missing)}</p>'
    return f'<img src="{uri}" alt="{escape(alt)}">'


_PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
td.t{text-align:left} th{background:#eee;cursor:pointer;user-select:none}
tr.best td{background:#e6f4e6;font-weight:600}
img{max-width:100%;border:1px solid #ddd}
.missing{color:#a33;font-style:italic}
details{margin:0.4em 0} summary{cursor:pointer}
pre{background:#f7f7f7;padding:0.6em;overflow:auto;font-size:12px}
"""

_PAGE_SCRIPT = """
window.reportErrors = [];
window.addEventListener('error', e => { window.reportErrors.push(String(e.message)); });
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0];
  const col = Array.from(th.parentNode.children).indexOf(th);
  const down = th.dataset.order !== 'desc';
  th.dataset.order = down ? 'desc' : 'asc';
  const key = tr => { const c = tr.children[col]; const v = c.dataset.v ?? c.textContent;
                      const n = parseFloat(v); return isNaN(n) ? v : n; };
  Array.from(body.rows).sort((a, b) => { const x = key(a), y = key(b);
      const r = x < y ? -1 : x > y ? 1 : 0; return down ? -r : r; })
    .forEach(tr => body.appendChild(tr));
}
window.addEventListener('load', () => {
  const broken = Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.dataset.images = document.images.length;
  document.body.dataset.brokenImages = broken.length;
  document.body.dataset.errors = window.reportErrors.length;
  document.body.dataset.ready = 'yes';
});
"""

_TABLE = [("dataset", "dataset", None), ("backbone", "backbone", None), ("features", "mode", None),
          ("head", "head", None), ("val acc", "validation_accuracy", "%"),
          ("test acc", "test_accuracy", "%"), ("top-5", "top5_accuracy", "%"),
          ("macro-F1", "macro_f1", "%"), ("fit s", "fit_seconds", ".1f"),
          ("predict ms/img", "predict_ms_per_image", ".3f"), ("width", "feature_width", "d"),
          ("n train", "n_train", "d")]


def _cell(value, fmt: str | None) -> str:
    from html import escape

    if fmt is None:
        return f'<td class="t">{escape(str(value))}</td>'
    if value is None:
        return '<td data-v="-1">-</td>'
    text = f"{100 * value:.2f}%" if fmt == "%" else format(value, fmt)
    return f'<td data-v="{value}">{text}</td>'


def _curves_section(results_dir: Path) -> str:
    return ("<h2>Learning curves: which head for how many images per class</h2>\n<p>Each point: "
            "the mean test accuracy over seeded draws of k training images per class (the same "
            "draws for every head), validation carved from the draw's own rows; the band: one "
            "standard deviation; the star: all training images. Numbers in curves.csv.</p>\n"
            + _img(results_dir / "curves.png", "learning curves", "curves.png is missing"))


def write_report(rows: list[dict], records: dict[Path, ResultRecord], results_dir: Path, *,
                 curves: bool = False) -> Path:
    """``report.html``: one self-contained page (pictures inlined, no network, opens from
    file://) with the sortable table (the pick on validation marked), the accuracy-vs-cost
    plot, each result's confusion matrix and mistakes, and each feature file's 2-D view and
    provenance. What is gone (a feature file, the images) is said, never a failure."""
    import json
    from html import escape

    from pipeline.store import read_attrs

    best = _best_per_dataset(rows)
    head = "".join(f'<th onclick="sortBy(this)">{escape(title)}</th>' for title, _, _ in _TABLE)
    body = []
    for r in rows:
        cells = "".join(_cell(r[key], fmt) for _, key, fmt in _TABLE)
        mark = ' class="best" title="best on validation"' if id(r) in best else ""
        body.append(f'<tr{mark}>{cells}</tr>')
    sections = []
    for r in rows:
        folder = results_dir / r["result"]
        mistakes = folder / "mistakes.csv"
        listed = ""
        if mistakes.exists():  # every off-diagonal count of the confusion matrix is a line there
            matrix = np.asarray(records[folder].confusion_matrix)
            listed = (f" ({int(matrix.sum() - np.trace(matrix)):,} mistakes, in "
                      f"{r['result']}/mistakes.csv)")
        title = (f"{r['dataset']} · {r['backbone']} {r['mode']} + {r['head']}: "
                 f"{100 * r['test_accuracy']:.2f}%{listed}")
        sections.append(
            f"<details><summary>{escape(title)}</summary>"
            + _img(folder / "confusion.png", f"confusion matrix of {r['result']}",
                   f"{r['result']}/confusion.png is missing")
            + _img(folder / "mistakes.png", f"mistakes of {r['result']}",
                   "no mistakes sheet: no mistakes, or the feature file has no row ids, or the "
                   "original images could not be read when the head was trained")
            + "</details>")
    files: dict[str, str] = {}
    for record in records.values():
        for f in record.features_files or [{"path": record.features_file, "key": record.features_key}]:
            files.setdefault(f["key"], f["path"])
    views = []
    for path in sorted(files.values()):
        name = Path(path).name
        png = results_dir / Path(path).stem / "features-2d.png"  # the file's results folder
        why = feature_view(Path(path), png)
        try:
            provenance = json.dumps(read_attrs(Path(path)).get("provenance", {}), indent=1)
            provenance_html = (f"<details><summary>provenance</summary><pre>{escape(provenance)}"
                               "</pre></details>")
        except OSError:
            provenance_html = (f'<p class="missing">feature file {escape(path)} is gone (its '
                               "provenance with it)</p>")
        views.append(f"<h3>{escape(name)}</h3>"
                     + (f'<p class="missing">no 2-D view: {escape(why)}</p>' if why else
                        _img(png, f"2-D view of {name}", f"{png} is missing"))
                     + provenance_html)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Head comparison</title>
<style>{_PAGE_STYLE}</style><script>{_PAGE_SCRIPT}</script></head>
<body>
<h1>Head comparison: {len(rows)} result(s)</h1>
<p>Click a column to sort. The row in green is, per dataset, the result with the best
<em>validation</em> accuracy: the one to pick (test accuracy is for reporting).</p>
<table id="results"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Accuracy against cost</h2>
{_img(results_dir / "compare.png", "accuracy against fit time", "compare.png is missing")}
{_curves_section(results_dir) if curves else ""}
<h2>Each result: confusion matrix and most confident mistakes</h2>
{chr(10).join(sections)}
<h2>Feature files: 2-D views and provenance</h2>
{chr(10).join(views)}
</body></html>
"""
    path, tmp = results_dir / "report.html", results_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a browser open on the old page never reads half a new one
    return path
