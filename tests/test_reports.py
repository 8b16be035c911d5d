import csv
from pathlib import Path

import numpy as np
import pytest

from pipeline.reports import collect_results, compare, markdown_table, plot_confusion
from pipeline.results import ResultRecord


def _result(root, key, head, acc, dataset="cifar10", fit=1.0, val=None, params=None):
    out = root / key / head
    out.mkdir(parents=True)
    ResultRecord(head=head, head_ran=head, params=params or {},
                 validation_accuracy=acc if val is None else val, test_accuracy=acc,
                 macro_f1=acc - 0.01, fit_seconds=fit, predict_ms_per_image=0.01, n_train=100,
                 features={"dataset": dataset, "backbone": "mobilenet_v2", "alpha": 0.35,
                           "mode": "avg", "layers": [], "width": 1280},
                 features_checksum="c" + key).save(out)


def test_compare_writes_csv_markdown_and_plot_with_best_marked(tmp_path):
    _result(tmp_path, "k1", "logreg", 0.80)
    _result(tmp_path, "k1", "mlp", 0.85, fit=3.0)
    _result(tmp_path, "k2", "logreg", 0.90, dataset="fashion_mnist")
    lines = []
    rows = compare(tmp_path, out=lines.append)
    assert [r["head"] for r in rows] == ["mlp", "logreg", "logreg"]  # per dataset, best first
    table = (tmp_path / "compare.md").read_text()
    assert table.count("**best**") == 2 and "85.00% **best**" in table
    with open(tmp_path / "compare.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 3 and {"top5_accuracy", "per_class_recall"} <= set(csv_rows[0])
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert "mobilenet_v2@0.35" in lines[0]


def test_half_written_metrics_are_ignored(tmp_path):
    _result(tmp_path, "k1", "logreg", 0.8)
    (tmp_path / "k1" / "mlp").mkdir()
    (tmp_path / "k1" / "mlp" / "metrics.json").write_text('{"test_accur')
    assert [r["head"] for r in collect_results(tmp_path)] == ["logreg"]


def test_no_results_says_what_to_do(tmp_path):
    lines = []
    assert compare(tmp_path, out=lines.append) == []
    assert "train heads first" in lines[0]


def test_confusion_plot_shows_the_row_normalised_matrix(tmp_path):
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.Figure.savefig

    def keep(fig, path, **kw):
        [ax, _] = fig.axes  # the matrix and its colour bar
        captured["image"] = ax.images[0].get_array()
        captured["cells"] = [t.get_text() for t in ax.texts]
        captured["labels"] = [t.get_text() for t in ax.get_xticklabels()]
        real(fig, path, **kw)

    plt.Figure.savefig = keep
    try:
        plot_confusion([[5, 1], [0, 6]], ["a", "b"], "t", tmp_path / "c.png")
    finally:
        plt.Figure.savefig = real
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert captured["image"].tolist() == [[5 / 6, 1 / 6], [0.0, 1.0]]
    assert captured["cells"] == ["5", "1", "0", "6"] and captured["labels"] == ["a", "b"]


def test_markdown_table_has_a_row_per_result(tmp_path):
    _result(tmp_path, "k1", "logreg", 0.8)
    _result(tmp_path, "k1", "mlp", 0.75)
    header, rule, *rows = markdown_table(collect_results(tmp_path)).strip().splitlines()
    assert header.startswith("| dataset | backbone") and rule.count("---") == 11
    assert rows == ["| cifar10 | mobilenet_v2@0.35 | avg | logreg | 80.00% | 80.00% **best** | "
                    "79.00% | 1.0 | 0.010 | 1280 | 100 |", "| cifar10 | mobilenet_v2@0.35 | avg | "
                    "mlp | 75.00% | 75.00% | 74.00% | 1.0 | 0.010 | 1280 | 100 |"]


def test_best_is_chosen_on_validation_never_on_test(tmp_path):
    _result(tmp_path, "k1", "logreg", 0.80, val=0.78)
    _result(tmp_path, "k1", "mlp", 0.82, val=0.77, params={"hidden": 512, "alpha": 0.001})
    table = markdown_table(collect_results(tmp_path))
    assert "| logreg | 78.00% | 80.00% **best** |" in table
    assert "| mlp(alpha=0.001,hidden=512) | 77.00% | 82.00% |" in table


def test_titles_and_labels_tell_layers_and_widths_apart():
    from pipeline.reports import feature_labels, result_title

    features = {"dataset": "idx:fashion-mnist", "backbone": "mobilenet", "alpha": 0.25,
                "mode": "avg", "layers": ["a", "b", "c"], "image_size": 224}
    assert feature_labels(features) == ("mobilenet@0.25", "avg[3 layers]")
    title = result_title(ResultRecord(head="logreg", params={}, test_accuracy=0.9106, macro_f1=0.9,
                                      fit_seconds=1.0, predict_ms_per_image=0.1, features=features,
                                      features_checksum="c"))
    assert title == "idx:fashion-mnist mobilenet@0.25 avg[3 layers] 224px + logreg: 91.06%"


def test_compare_plot_labels_do_not_overlap(tmp_path, monkeypatch):
    from pipeline import reports

    boxes = []
    real = reports._label_without_overlap

    def spy(ax, points, labels, fontsize=7):
        real(ax, points, labels, fontsize)
        ax.figure.canvas.draw()
        renderer = ax.figure.canvas.get_renderer()
        boxes.extend(t.get_window_extent(renderer) for t in ax.texts)

    monkeypatch.setattr(reports, "_label_without_overlap", spy)
    rows = [{"dataset": "d", "backbone": f"net{i}", "mode": "avg", "head": "logreg",
             "test_accuracy": 0.9 + 0.0001 * i, "fit_seconds": 10.0 + 0.01 * i} for i in range(6)]
    reports.plot_accuracy_vs_cost(rows, tmp_path / "p.png")
    assert len(boxes) == 6
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert overlaps == []


def test_compare_plot_numbers_the_features_and_spells_them_out_under_the_panel(tmp_path,
                                                                             monkeypatch):
    import matplotlib.figure

    from pipeline import reports

    figures = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k)))

    def row(backbone, mode, head, acc, val):
        return {"dataset": "d", "backbone": backbone, "mode": mode, "head": head,
                "test_accuracy": acc, "validation_accuracy": val, "fit_seconds": 5.0}

    rows = [row("a@0.25 + b@0.35", "avg[6 layers]+flip + avg", "mlp", 0.92, 0.90),
            row("a@0.25 + b@0.35", "avg[6 layers]+flip + avg", "logreg", 0.90, 0.93),
            row("b@0.35", "avg", "logreg", 0.80, 0.80)]
    reports.plot_accuracy_vs_cost(rows, tmp_path / "p.png")
    [fig] = figures
    panel, key = fig.axes[:2]
    assert panel.get_title() == "d"
    labels = {(round(t.xy[1], 2), t.get_text()) for t in panel.texts}
    assert labels == {(92.0, "1"), (90.0, "1"), (80.0, "2")}  # one number per features
    assert key.texts[0].get_text() == " 1  a@0.25 avg[6 layers]+flip + b@0.35 avg\n 2  b@0.35 avg"
    legend = [t.get_text() for t in panel.get_legend().get_texts()]
    assert legend == ["logreg", "mlp", "best on validation"]
    [ring] = [c for c in panel.collections if c.get_label() == "best on validation"]
    assert [tuple(o) for o in ring.get_offsets()] == [(5.0, 90.0)]  # logreg: best validation


# ----------------------------------------------------------------------------- report.html

ODD = 'odd <img src=x onerror=alert(1)> "data" ü'


@pytest.fixture
def real_results(tmp_path):
    """Two heads trained on features of an image folder with an odd name: (results, cache)."""
    from conftest import write_image_folder_split

    from pipeline import extract, train

    root = tmp_path / ODD
    write_image_folder_split(root / "train", 8, seed=1)
    write_image_folder_split(root / "test", 4, seed=2)
    (root / "test" / "c0").rename(root / "test" / "swap")  # some mistakes to show
    (root / "test" / "c1").rename(root / "test" / "c0")
    (root / "test" / "swap").rename(root / "test" / "c1")
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    with extract(f"folder:{root}", backbone="mobilenet_v2", alpha=0.35, weights="none",
                 image_size=32, cache_dir=str(cache)) as ff:
        for head in ("logreg", "knn"):
            train(ff, head, results_dir=results_dir)
    return results_dir, cache


def _browser(page: Path, out_dir: Path) -> tuple[str, str]:
    """(DOM after the page's scripts ran, browser log) from headless Chromium; a screenshot
    is kept in ``out_dir``."""
    import os
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "chromium is not installed (.ci/run installs Debian's chromium package)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=10000", f"--user-data-dir={out_dir / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    shot = subprocess.run([*flags, f"--screenshot={out_dir / 'report.png'}",
                           "--window-size=1200,2000", page.as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    return dom.stdout, dom.stderr + shot.stderr


def _body(dom: str) -> dict:
    import re

    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag))


def test_the_report_opens_offline_in_a_real_browser_with_every_picture(real_results, tmp_path):
    results_dir, cache = real_results
    rows = compare(results_dir, out=lambda *_: None, cache_dir=cache)
    page = results_dir / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched: works from file://
    dom, log = _browser(page, tmp_path)
    body = _body(dom)
    # compare.png, a confusion matrix and a mistakes sheet per result, one 2-D view per file
    assert body["ready"] == "yes" and body["errors"] == "0" and body["broken-images"] == "0"
    assert int(body["images"]) == 1 + 2 * len(rows) + 1
    table = dom.split('<table id="results">')[1].split("</table>")[0]
    assert table.split("<tbody>")[1].count("<tr") == len(rows) == 2
    assert table.count('class="best"') == 1  # the pick on validation, per dataset
    assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", "")
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_odd_names_are_escaped_in_the_report(real_results):
    results_dir, cache = real_results
    compare(results_dir, out=lambda *_: None, cache_dir=cache)
    text = (results_dir / "report.html").read_text()
    assert "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(1)&gt; &quot;data&quot; ü" in text  # in the provenance


def test_a_report_on_results_whose_features_and_images_are_gone_says_what_is_missing(
        real_results, tmp_path):
    results_dir, cache = real_results
    for path in cache.glob("*.h5"):
        path.unlink()
    for sheet in results_dir.rglob("mistakes.png"):
        sheet.unlink()
    compare(results_dir, out=lambda *_: None)
    text = (results_dir / "report.html").read_text()
    assert text.count("is gone (its provenance with it)") == 1
    assert "no 2-D view: feature file" in text and text.count("no mistakes sheet") == 2
    body = _body(_browser(results_dir / "report.html", tmp_path)[0])
    assert body["errors"] == "0" and body["broken-images"] == "0"


def test_compare_summarises_learning_curves_per_k_with_their_spread(blobs_file, tmp_path):
    from pipeline.results import ResultRecord
    from pipeline.training import train_curve

    results_dir = tmp_path / "results"
    points = {}
    for head in ("logreg", "knn"):
        points[head] = train_curve(blobs_file, head, shots=[1, 3, "all"], tries=3,
                                   results_dir=results_dir)
    compare(results_dir, out=lambda *_: None)
    with open(results_dir / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["head"], r["shots"], r["tries"]) for r in rows] == [
        (h, k, t) for h in ("knn", "logreg") for k, t in (("1", "3"), ("3", "3"), ("all", "1"))]
    import numpy as np

    accuracy = [ResultRecord.load(out).test_accuracy for _, out in points["knn"][3:6]]  # k = 3
    assert float(rows[1]["mean_test_accuracy"]) == pytest.approx(np.mean(accuracy))
    assert float(rows[1]["std_test_accuracy"]) == pytest.approx(np.std(accuracy, ddof=1))
    assert rows[0]["validation"] == "none (fixed setting)" and rows[1]["validation"] == "carved from the draw"
    assert (results_dir / "curves.png").stat().st_size > 10_000
    assert "Learning curves" in (results_dir / "report.html").read_text()
    table = (results_dir / "compare.md").read_text()
    assert table.count("\n") == 2 + 2  # the curves' points are not rows of the results table


def test_the_mistakes_sheet_puts_each_image_in_its_cell_and_marks_the_gone_ones():
    from pipeline.reports import _contact_sheet

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255  # red
    grey = np.full((16, 16), 90, np.uint8)  # smaller and grey: scaled up, same in every channel
    chosen = [(("cat", "dog"), 5, [{}, {}]), (("dog", "cat"), 1, [{}])]
    sheet, (h, w, gap) = _contact_sheet(chosen, [rgb, grey, None], per_pair=3)
    assert (h, w, gap) == (32, 32, 4) and sheet.shape == (2 * (32 + 2 * gap), 3 * (32 + gap), 3)
    assert (sheet[:32, :32] == rgb).all()
    assert (sheet[:32, 36:68] == 90).all()
    assert (sheet[40:72, :32] == 200).all()  # gone: grey
    assert (sheet[:32, 72:] == 255).all() and (sheet[40:72, 36:] == 255).all()  # no image: white
