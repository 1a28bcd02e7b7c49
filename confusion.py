"""Evaluation shared by Parts 2 and 3: top-k accuracy, confusion matrices, and the single-frame vs LSTM report.

    python confusion.py --single singleFrame_results.npz --lstm lstm_results.npz --out report

A results file (written by singleFrameAccuracy.py and rnn.py) holds, for every test clip scored, its name,
label and class scores. This script writes, for each model, the confusion matrix (PNG and CSV) and the most
confused class pairs, then the classes that the LSTM improved most, and those it did not improve or made worse,
as a table (markdown and CSV) and a bar chart.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import csv
import os
import sys
import zipfile

import matplotlib
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, top_k_accuracy_score

from ucf.errors import DataError, warn
from ucf.files import atomic_path
from ucf.flags import HelpFormatter
from ucf.provenance import make_provenance, parse_provenance, provenance_text, same_extraction
from ucf.runcontrol import exit_on_user_error

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


TOPK = (1, 5, 10)  # the handout's accuracies


def topk_accuracies(labels, scores, ks=TOPK):
    """Top-k accuracy for each k; a k at or beyond the number of classes is 1 by definition."""
    n_classes = scores.shape[1]
    if n_classes == 2:  # scikit-learn reads two columns as a binary problem and wants one column of scores
        return tuple(1.0 if k >= 2 else float(np.mean(np.argmax(scores, axis=1) == labels)) for k in ks)
    return tuple(1.0 if k >= n_classes else
                 float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(n_classes))) for k in ks)


def format_accuracy(accuracies):
    """The handout's line, e.g. 'Accuracy(top 1, top 5, top 10): (0.626,0.853,0.915)'."""
    return 'Accuracy(top 1, top 5, top 10): (' + ','.join(f'{a:.3f}' for a in accuracies) + ')'


def per_class_accuracy(counts):
    """Recall of each class from a confusion count matrix (NaN for a class with no test clip)."""
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.diag(counts) / counts.sum(axis=1)


def confusion_counts(labels, scores):
    return confusion_matrix(labels, scores.argmax(axis=1), labels=np.arange(scores.shape[1]))


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


def save_results(path, clips, labels, scores, classes, **info):
    """A results file: clip names, labels, scores (clips x classes) and the class names."""
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, clips=np.array(clips), labels=np.asarray(labels, np.int32),
                 scores=np.asarray(scores, np.float32), classes=np.array(classes),
                 **{k: np.array(v) for k, v in info.items()})


WRITERS = {'single frame': ('--single', 'singleFrameAccuracy.py'), 'lstm': ('--lstm', 'rnn.py')}
RESULT_KEYS = ('clips', 'labels', 'scores', 'classes')


def load_results(path, model=None):
    """A results file as a dict; DataError for a file that is not one (truncated, text, another .npz) or that
    holds another model's results than `model` ('single frame' or 'lstm') where given."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: results file not found; singleFrameAccuracy.py and rnn.py write them')
    try:
        with np.load(path) as f:
            results = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile) as e:  # text, .npy, cut short
        raise DataError(f'{path}: not a readable results file ({type(e).__name__}: {str(e)[:120]}); rerun '
                        'singleFrameAccuracy.py or rnn.py, which write it') from None
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise DataError(f'{path} holds no {", ".join(missing)}: it is not a results file of singleFrameAccuracy.py '
                        'or rnn.py')
    held = str(results['model'][()]) if 'model' in results else None
    if model and held and held != model:
        flag, writer = WRITERS[model]
        raise DataError(f'{path} holds the results of the {held} model, not of the {model} model: {flag} takes '
                        f'the file that {writer} writes (were --single and --lstm swapped?)')
    return results


def results_provenance(single, lstm, single_path, lstm_path):
    """The two results' provenance records; DataError when their inputs came from different extractions."""
    sources = [parse_provenance(r['provenance'][()] if 'provenance' in r else None) for r in (single, lstm)]
    a, b = same_extraction(*sources, single_path, lstm_path,
                           'compare results of one extraction (rerun singleFrameAccuracy.py or rnn.py on it)')
    if not (a and b):
        warn('a results file records no extraction (written by an older version): cannot check that both '
             'models saw the same features')
    return sources


def report_model(results, out_prefix, title, stream=None):
    """Print the accuracy line and the most confused pairs; save the confusion matrix and per-class CSV."""
    stream = stream or sys.stdout
    labels, scores, classes = results['labels'], results['scores'], list(results['classes'])
    accuracies = topk_accuracies(labels, scores)
    counts = confusion_counts(labels, scores)
    print(f'{title}: {len(labels)} test clips scored', file=stream)
    print(format_accuracy(accuracies), file=stream)
    save_confusion(counts, classes, out_prefix + '_confusion', f'{title}: confusion (rows: true class)')
    recall = per_class_accuracy(counts)
    with atomic_path(out_prefix + '_per_class.csv') as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['class', 'clips', 'accuracy'])
        for name, total, acc in zip(classes, counts.sum(axis=1), recall):
            writer.writerow([name, int(total), f'{acc:.4f}'])
    print('most confused (true -> predicted: share of the true class):', file=stream)
    for true, predicted, share, count in most_confused(counts, classes, 10):
        print(f'  {true} -> {predicted}: {share:.2f} ({count} clips)', file=stream)
    return accuracies, recall


def class_accuracies(single, lstm, stream=None):
    """(class names, test clips per class, single-frame and LSTM per-class accuracy) on the clips both scored."""
    if list(single['classes']) != list(lstm['classes']):
        raise DataError('the two results files have different class lists')
    if sorted(single['clips']) != sorted(lstm['clips']):
        common = set(single['clips']) & set(lstm['clips'])
        print(f'note: comparing on the {len(common)} clips both models scored', file=stream or sys.stdout)
        single, lstm = (restrict(r, common) for r in (single, lstm))
    single_counts = confusion_counts(single['labels'], single['scores'])
    return (list(single['classes']), single_counts.sum(axis=1), per_class_accuracy(single_counts),
            per_class_accuracy(confusion_counts(lstm['labels'], lstm['scores'])))


def most_changed(before, after, n):
    """Indices of the n classes the LSTM improved most, and of the n it improved least (no change or worse)."""
    change = after - before
    valid = np.flatnonzero(~np.isnan(change))
    order = valid[np.argsort(-change[valid], kind='stable')]
    return [i for i in order if change[i] > 0][:n], [i for i in order[::-1] if change[i] <= 0][:n]


def write_improvement(out_dir, classes, clips, before, after, improved, not_improved):
    """improvement.csv and improvement.md; returns the Markdown table's lines."""
    rows = [('improved most', i) for i in improved] + [('not improved', i) for i in not_improved]
    change = after - before
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, 'improvement.csv')) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['group', 'class', 'test clips', 'single frame', 'lstm', 'change'])
        for group, i in rows:
            writer.writerow([group, classes[i], int(clips[i]), f'{before[i]:.3f}', f'{after[i]:.3f}',
                             f'{change[i]:+.3f}'])
    lines = ['| group | class | test clips | single frame | LSTM | change |', '|---|---|---:|---:|---:|---:|']
    lines += [f'| {g} | {classes[i]} | {int(clips[i])} | {before[i]:.3f} | {after[i]:.3f} | {change[i]:+.3f} |'
              for g, i in rows]
    with atomic_path(os.path.join(out_dir, 'improvement.md')) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return lines


def plot_improvement(path, classes, before, after, improved, not_improved):
    shown = improved + not_improved
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(shown) + 2), 5))
    x = np.arange(len(shown))
    ax.bar(x - 0.2, before[shown], 0.4, label='single frame')
    ax.bar(x + 0.2, after[shown], 0.4, label='LSTM')
    ax.set_xticks(x, [classes[i] for i in shown], rotation=60, ha='right', fontsize=8)
    if improved and not_improved:
        ax.axvline(len(improved) - 0.5, color='gray', linestyle='--')
    ax.set_ylabel('per-class test accuracy')
    ax.set_ylim(0, 1.05)
    ax.set_title('Classes the LSTM improved most (left) and did not improve (right)')
    ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0))  # outside the bars
    fig.tight_layout()
    with atomic_path(path) as tmp:  # tight: the title is wider than the bars
        fig.savefig(tmp, dpi=110, format='png', bbox_inches='tight')
    plt.close(fig)


def compare(single, lstm, out_dir, n=10, stream=None):
    """Per-class accuracy of both models: the n most improved classes and those not improved, table + chart."""
    classes, clips, before, after = class_accuracies(single, lstm, stream)
    improved, not_improved = most_changed(before, after, n)
    lines = write_improvement(out_dir, classes, clips, before, after, improved, not_improved)
    print('\n'.join(lines), file=stream or sys.stdout)
    plot_improvement(os.path.join(out_dir, 'improvement.png'), classes, before, after, improved, not_improved)
    return [(classes[i], before[i], after[i]) for i in improved], [(classes[i], before[i], after[i])
                                                                    for i in not_improved]


def restrict(results, clips):
    keep = np.array([c in clips for c in results['clips']])
    return {k: (v[keep] if k in ('clips', 'labels', 'scores') else v) for k, v in results.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--single', default='singleFrame_results.npz', help='from singleFrameAccuracy.py')
    p.add_argument('--lstm', default='lstm_results.npz', help='from rnn.py')
    p.add_argument('--out', '-o', default='report', help='folder for the plots and tables')
    p.add_argument('--top', type=int, default=10, help='classes to list in each group')
    args = p.parse_args(argv)
    with exit_on_user_error():
        single, lstm = load_results(args.single, 'single frame'), load_results(args.lstm, 'lstm')
        sources = results_provenance(single, lstm, args.single, args.lstm)
        os.makedirs(args.out, exist_ok=True)
        with atomic_path(os.path.join(args.out, 'provenance.json')) as tmp, open(tmp, 'w') as f:
            f.write(provenance_text(make_provenance('confusion.py', single_frame=sources[0], lstm=sources[1])))
        report_model(single, os.path.join(args.out, 'singleFrame'), 'single frame')
        report_model(lstm, os.path.join(args.out, 'lstm'), 'LSTM')
        return compare(single, lstm, args.out, args.top)


if __name__ == '__main__':
    main()
