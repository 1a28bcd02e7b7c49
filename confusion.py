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
from ucf.results import Results, comparable, on_common_clips, same_features
from ucf.runcontrol import exit_on_user_error
from ucf.streams import StreamPath, add_stream_flag, apply_stream

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def class_accuracies(before, after, stream=None):
    """(class names, test clips per class, each model's per-class accuracy) on the clips both scored."""
    before, after = on_common_clips(before, after, stream)
    return before.classes, before.confusion().sum(axis=1), before.per_class(), after.per_class()


def most_changed(before, after, n):
    """Indices of the n classes the second model improved most, and of the n it improved least (no change or
    worse)."""
    change = after - before
    valid = np.flatnonzero(~np.isnan(change))
    order = valid[np.argsort(-change[valid], kind='stable')]
    return [i for i in order if change[i] > 0][:n], [i for i in order[::-1] if change[i] <= 0][:n]


def write_improvement(prefix, labels, classes, clips, before, after, improved, not_improved):
    """prefix.csv and prefix.md (labels: the two models' names); returns the Markdown table's lines."""
    rows = [('improved most', i) for i in improved] + [('not improved', i) for i in not_improved]
    change = after - before
    os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)
    with atomic_path(prefix + '.csv') as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['group', 'class', 'test clips', labels[0].lower(), labels[1].lower(), 'change'])
        for group, i in rows:
            writer.writerow([group, classes[i], int(clips[i]), f'{before[i]:.3f}', f'{after[i]:.3f}',
                             f'{change[i]:+.3f}'])
    lines = [f'| group | class | test clips | {labels[0]} | {labels[1]} | change |', '|---|---|---:|---:|---:|---:|']
    lines += [f'| {g} | {classes[i]} | {int(clips[i])} | {before[i]:.3f} | {after[i]:.3f} | {change[i]:+.3f} |'
              for g, i in rows]
    with atomic_path(prefix + '.md') as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return lines


def plot_improvement(path, labels, classes, before, after, improved, not_improved):
    shown = improved + not_improved
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(shown) + 2), 5))
    x = np.arange(len(shown))
    ax.bar(x - 0.2, before[shown], 0.4, label=labels[0])
    ax.bar(x + 0.2, after[shown], 0.4, label=labels[1])
    ax.set_xticks(x, [classes[i] for i in shown], rotation=60, ha='right', fontsize=8)
    if improved and not_improved:
        ax.axvline(len(improved) - 0.5, color='gray', linestyle='--')
    ax.set_ylabel('per-class test accuracy')
    ax.set_ylim(0, 1.05)
    ax.set_title(f'Classes the {labels[1]} improved most (left) and did not improve (right)')
    ax.legend(loc='upper left', bbox_to_anchor=(1.0, 1.0))  # outside the bars
    fig.tight_layout()
    with atomic_path(path) as tmp:  # tight: the title is wider than the bars
        fig.savefig(tmp, dpi=110, format='png', bbox_inches='tight')
    plt.close(fig)


def compare(before, after, out_dir, n=10, stream=None):
    """Per-class accuracy of two models: the n classes the second improved most and those it did not, as a table
    and a chart in out_dir (improvement.*: single frame to LSTM, the handout's; improvement_A_to_B.* else)."""
    labels = before.label, after.label
    name = ('improvement' if (before.prefix, after.prefix) == ('singleFrame', 'lstm') else
            f'improvement_{before.prefix}_to_{after.prefix}')
    classes, clips, first, second = class_accuracies(before, after, stream)
    improved, not_improved = most_changed(first, second, n)
    lines = write_improvement(os.path.join(out_dir, name), labels, classes, clips, first, second, improved,
                              not_improved)
    print(f'{labels[0]} -> {labels[1]}, per class:', file=stream or sys.stdout)
    print('\n'.join(lines), file=stream or sys.stdout)
    plot_improvement(os.path.join(out_dir, name + '.png'), labels, classes, first, second, improved, not_improved)
    return ([(classes[i], first[i], second[i]) for i in improved],
            [(classes[i], first[i], second[i]) for i in not_improved])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_stream_flag(p)
    p.add_argument('--single', default=StreamPath('singleFrame_results.npz'), help='from singleFrameAccuracy.py')
    p.add_argument('--lstm', default=StreamPath('lstm_results.npz'), help='from rnn.py')
    p.add_argument('--compare', nargs=2, metavar=('BEFORE', 'AFTER'),
                   help='any two results files instead (e.g. the rgb and the two-stream single frame: which classes '
                        'the flow stream improves)')
    p.add_argument('--out', '-o', default='report', help='folder for the plots and tables')
    p.add_argument('--top', type=positive_int, default=10, help='classes to list in each group')
    args = apply_stream(p.parse_args(argv))
    with exit_on_user_error():
        check_outputs(folders={'--out': args.out})
        if args.compare:
            paths = args.compare
            before, after = (Results.load(path) for path in paths)
            comparable(before, after, *paths)
            sources = [before.provenance, after.provenance]
        else:
            paths = args.single, args.lstm
            before, after = Results.load(args.single, 'single frame'), Results.load(args.lstm, 'lstm')
            sources = same_features(before, after, *paths)
        os.makedirs(args.out, exist_ok=True)
        record = 'provenance' + ('' if (before.prefix, after.prefix) == ('singleFrame', 'lstm') else
                                 f'_{before.prefix}_to_{after.prefix}')
        with atomic_path(os.path.join(args.out, record + '.json')) as tmp, open(tmp, 'w') as f:
            f.write(provenance_text(make_provenance('confusion.py', **{
                'single_frame' if r.prefix == 'singleFrame' else r.prefix: source
                for r, source in zip((before, after), sources)})))
        for results in (before, after):
            report_model(results, os.path.join(args.out, results.prefix), results.label)
        return compare(before, after, args.out, args.top)


if __name__ == '__main__':
    main()
