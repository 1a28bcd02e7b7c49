"""Part 3: train a variety of LSTMs in one command and write the table the handout asks for.

    python rnnSweep.py --grid lstm-layers=1,2 --grid dropout=0,0.3 -- --epoch 10 --inference full segments

trains one model per combination of the --grid values (each `rnn.py` flag=value list; a flag without values,
like `--grid batchnorm=on,off`, is switched on or off), the arguments after `--` going to every run, and writes
sweep_results.md and sweep_results.csv: configuration, final training loss and accuracy, and test top-1/5/10 of
every inference technique. Each run keeps its own folder in --out, named by its grid values and a digest of all
its settings (the arguments after `--` included), and a run that is already complete with exactly those settings
is not trained again, so an interrupted sweep continues where it stopped while a changed argument trains anew.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import csv
import hashlib
import itertools
import json
import os
import sys

import rnn
from ucf.results import TOPK
from ucf.files import atomic_path
from ucf.flags import split_at_dashes


def parse_grid(items):
    """['lstm-layers=1,2', 'batchnorm=on,off'] -> [('lstm-layers', ['1', '2']), ('batchnorm', ['on', 'off'])]"""
    grid = []
    for item in items:
        name, sep, values = item.partition('=')
        if not sep or not values:
            raise SystemExit(f'error: --grid {item!r}: expected flag=value1,value2,...')
        grid.append((name.lstrip('-'), values.split(',')))
    return grid


def flags_for(setting):
    flags = []
    for name, value in setting:
        if value in ('on', 'off'):
            flags += [f'--{name}'] if value == 'on' else []
        else:
            flags += [f'--{name}', value]
    return flags


def run_name(setting):
    return '_'.join(f'{name}={value}' for name, value in setting) or 'base'


def run_settings(run_args):
    """Everything that makes a run what it is: rnn.py's parsed arguments but where it writes."""
    settings = vars(rnn.parse_args(run_args))
    return {k: v for k, v in settings.items() if k not in ('out', 'model_out', 'results', 'resume')}


def final_training(out):
    """Training loss and accuracy of the last epoch, from the run's LogReport file."""
    with open(os.path.join(out, 'log')) as f:
        last = json.load(f)[-1]
    return last['main/loss'], last['main/accuracy']


def main(argv=None):
    argv, common = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--grid', action='append', default=[], help='flag=value1,value2 (repeatable)')
    p.add_argument('--out', '-o', default='result_sweep', help='folder of the runs and the table')
    args = p.parse_args(argv)
    grid = parse_grid(args.grid)
    settings = [list(zip([n for n, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]
    rows = []
    for i, setting in enumerate(settings, 1):
        name = run_name(setting)
        full = run_settings([*common, *flags_for(setting)])
        key = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:8]
        out = os.path.join(args.out, f'{name}_{key}')
        results = os.path.join(out, 'lstm_results.npz')
        run_args = [*common, *flags_for(setting), '--out', out, '--model-out', os.path.join(out, 'rnn.model'),
                    '--results', results]
        print(f'=== run {i} of {len(settings)}: {name} ({out})', file=sys.stderr, flush=True)
        done = os.path.join(out, 'final.json')
        stored = {}
        if os.path.isfile(results) and os.path.isfile(done):
            with open(done) as f:
                stored = json.load(f)
        if stored.get('settings') == full:
            final = {t: tuple(v) for t, v in stored['accuracies'].items()}
        else:
            final, _ = rnn.main(run_args + ['--resume', 'auto'])
            with atomic_path(done) as tmp, open(tmp, 'w') as f:
                json.dump(dict(settings=full, accuracies=final), f)
        loss, accuracy = final_training(out)
        for technique in full['inference']:
            rows.append(dict(configuration=name, inference=technique, train_loss=f'{loss:.4f}',
                             train_accuracy=f'{accuracy:.3f}',
                             **{f'top{k}': f'{a:.3f}' for k, a in zip(TOPK, final[technique])}))
    fields = ['configuration', 'inference', 'train_loss', 'train_accuracy', 'top1', 'top5', 'top10']
    os.makedirs(args.out, exist_ok=True)
    with atomic_path(os.path.join(args.out, 'sweep_results.csv')) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ['| ' + ' | '.join(fields) + ' |', '|' + '---|' * len(fields)]
    lines += ['| ' + ' | '.join(r[k] for k in fields) + ' |' for r in rows]
    table = '\n'.join(lines) + '\n'
    with atomic_path(os.path.join(args.out, 'sweep_results.md')) as tmp, open(tmp, 'w') as f:
        f.write(f'Common arguments: `{" ".join(common)}`\n\n' + table)
    print(table)
    return rows


if __name__ == '__main__':
    main()
