import csv

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
