"""Part 3: the comparison report, single frame against the LSTM.

    python confusion.py --single singleFrame_results.npz --lstm lstm_results.npz --out report

A results file (written by singleFrameAccuracy.py and rnn.py; ucf/results.py) holds, for every test clip scored,
its name, label and class scores. This script writes, for each model, the confusion matrix (PNG and CSV) and the most
confused class pairs, then the classes that the LSTM improved most, and those it did not improve or made worse,
as a table (markdown and CSV) and a bar chart.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import csv
import os
import sys

import matplotlib
import numpy as np

from ucf.files import atomic_path, check_outputs
from ucf.flags import HelpFormatter, positive_int
from ucf.provenance import make_provenance, provenance_text
from ucf.report import report_model
from ucf.results import Results, on_common_clips, same_features
from ucf.runcontrol import exit_on_user_error

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def class_accuracies(single, lstm, stream=None):
    """(class names, test clips per class, single-frame and LSTM per-class accuracy) on the clips both scored."""
    single, lstm = on_common_clips(single, lstm, stream)
    return single.classes, single.confusion().sum(axis=1), single.per_class(), lstm.per_class()


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
    return ([(classes[i], before[i], after[i]) for i in improved],
            [(classes[i], before[i], after[i]) for i in not_improved])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--single', default='singleFrame_results.npz', help='from singleFrameAccuracy.py')
    p.add_argument('--lstm', default='lstm_results.npz', help='from rnn.py')
    p.add_argument('--out', '-o', default='report', help='folder for the plots and tables')
    p.add_argument('--top', type=positive_int, default=10, help='classes to list in each group')
    args = p.parse_args(argv)
    with exit_on_user_error():
        check_outputs(folders={'--out': args.out})
        single, lstm = Results.load(args.single, 'single frame'), Results.load(args.lstm, 'lstm')
        sources = same_features(single, lstm, args.single, args.lstm)
        os.makedirs(args.out, exist_ok=True)
        with atomic_path(os.path.join(args.out, 'provenance.json')) as tmp, open(tmp, 'w') as f:
            f.write(provenance_text(make_provenance('confusion.py', single_frame=sources[0], lstm=sources[1])))
        report_model(single, os.path.join(args.out, 'singleFrame'), 'single frame')
        report_model(lstm, os.path.join(args.out, 'lstm'), 'LSTM')
        return compare(single, lstm, args.out, args.top)


if __name__ == '__main__':
    main()
