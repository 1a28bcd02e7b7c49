"""One model's report, drawn from its results (ucf/results.py computes, this draws): the accuracy line, the most
confused class pairs, the confusion matrix (PNG, CSV) and the per-class accuracy (CSV)."""
import csv
import sys

import matplotlib
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay

from ucf.files import atomic_path
from ucf.results import format_accuracy, per_class_accuracy

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def most_confused(counts, classes, n=10):
    """[(true class, predicted class, fraction of the true class's clips, count)], most frequent first: at most n
    pairs, only real confusions (a class is never listed as confused with itself; fewer if fewer exist)."""
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    off = counts.astype(np.float64) / totals
    np.fill_diagonal(off, 0)
    true, predicted = np.nonzero(off)
    order = np.lexsort((-counts[true, predicted], -off[true, predicted]))[:n]
    return [(classes[t], classes[p], float(off[t, p]), int(counts[t, p]))
            for t, p in zip(true[order], predicted[order])]


def save_confusion(counts, classes, prefix, title):
    """prefix.csv (counts, classes on both axes) and prefix.png (row-normalised), readable at 101 classes."""
    with atomic_path(prefix + '.csv') as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['true \\ predicted'] + list(classes))
        for name, row in zip(classes, counts):
            writer.writerow([name] + row.tolist())
    n = len(classes)
    side = max(6.0, 0.2 * n + 3)
    fig, ax = plt.subplots(figsize=(side, side))
    with np.errstate(invalid='ignore', divide='ignore'):
        normalized = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    ConfusionMatrixDisplay(normalized, display_labels=classes).plot(
        ax=ax, include_values=n <= 12, values_format='.2f', xticks_rotation='vertical', cmap='Blues',
        colorbar=True)
    ax.tick_params(labelsize=max(4, min(10, 600 / n)))
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(prefix + '.png') as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)


def report_model(results, out_prefix, title, stream=None):
    """Print the accuracy line and the most confused pairs; save the confusion matrix and per-class CSV.
    Returns (top-1/5/10, per-class accuracy)."""
    stream = stream or sys.stdout
    accuracies, counts = results.topk(), results.confusion()
    print(f'{title}: {len(results.labels)} test clips scored', file=stream)
    print(format_accuracy(accuracies), file=stream)
    save_confusion(counts, results.classes, out_prefix + '_confusion', f'{title}: confusion (rows: true class)')
    recall = per_class_accuracy(counts)
    with atomic_path(out_prefix + '_per_class.csv') as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['class', 'clips', 'accuracy'])
        for name, total, acc in zip(results.classes, counts.sum(axis=1), recall):
            writer.writerow([name, int(total), f'{acc:.4f}'])
    print('most confused (true -> predicted: share of the true class):', file=stream)
    for true, predicted, share, count in most_confused(counts, results.classes, 10):
        print(f'  {true} -> {predicted}: {share:.2f} ({count} clips)', file=stream)
    return accuracies, recall
