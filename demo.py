"""The whole pipeline on the built-in synthetic UCF-101, with the real scripts, in the handout's order.

    make demo            (or: .venv/bin/python demo.py --out demo)

What differs from a real run, to finish in a few minutes on 2 CPU cores: 8 classes instead of 101 (4 recognisable
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
from one frame, 2 pairs that differ only in motion), 160x120 clips of 30-80 frames, a randomly initialised
VGG16-shaped network (narrow, 32x32 inputs; no ImageNet weights can be downloaded here), a 128-d fc7 instead of
1024, and a shorter LSTM schedule. Every script, file format and step is the real one.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from ucf.runcontrol import usable_cpus


HERE = os.path.dirname(os.path.abspath(__file__))


def step(title, *command, cwd):
    print(f'\n=== {title}\n$ {" ".join(command)}', flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, os.path.join(HERE, command[0]), *command[1:]], cwd=cwd)
    if result.returncode:
        sys.exit(f'demo: step "{title}" failed (exit {result.returncode})')
    print(f'--- {title}: {time.time() - started:.1f}s', flush=True)
    return time.time() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', '-o', default='demo', help='folder for everything the demo writes')
    p.add_argument('--jobs', '-j', type=int, default=usable_cpus())
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work, j = args.out, str(args.jobs)
    started, times = time.time(), {}
    times['dataset'] = step('Synthetic UCF-101 (UCF-101/, ucfTrainTestlist/)', 'synthetic_ucf101.py', '--out', '.',
                            '--classes', '8', '--width', '160', '--height', '120', '--frames', '30', '80',
                            '--clips-per-group', '2', '2', '--jobs', j, cwd=work)
    times['vgg'] = step('A randomly initialised VGG.model (demo only)', 'VGGNet.py', '--random', '--insize', '32',
                        '--widths', '16', '32', '64', '128', '128', '--fc-size', '256', cwd=work)
    times['finetune'] = step('Part 1: fine-tune on random frames (frameBasedTrain.py)', 'frameBasedTrain.py',
                             '--epoch', '30', '--batchsize', '16', '--lr', '0.003', '--dropout', '0.2',
                             '--feature-size', '128', '--log-interval', '50', '--loaderjob', '0', '--cache-mb', '3000',
                             '--test-eval', '--conv', 'fast', cwd=work)
    times['extract'] = step('Part 2: extract features, 3 shards run locally (saveFeatures.sh)', 'generate_pbs.py',
                            '--scheduler', 'local', '--num-shards', '3', '--', '--batchsize', '64', '--conv', 'fast',
                            cwd=work)
    times['pack'] = step('Part 2: pack into HDF5 (save_hdf5.py)', 'save_hdf5.py', cwd=work)
    times['normalize'] = step('Part 2: normalise (normalizeData.py)', 'normalizeData.py', cwd=work)
    times['single'] = step('Part 2: single-frame accuracy (singleFrameAccuracy.py)', 'singleFrameAccuracy.py',
                           cwd=work)
    times['lstm'] = step('Part 3: LSTM (rnn.py)', 'rnn.py', '--epoch', '30', '--seqlen', '32', '--bptt', '8',
                         '--hidden', '128', '--fc', '128', '--batchsize', '16', '--dropout', '0.3', '--in-memory',
                         '--inference', 'full', 'segments', 'last', cwd=work)
    times['report'] = step('Part 3: comparison report (confusion.py)', 'confusion.py', '--top', '5', cwd=work)
    summarize(work, time.time() - started, times)


def summarize(work, seconds, times):
    sys.path.insert(0, HERE)
    from ucf.results import Results, format_accuracy, on_common_clips
    single = Results.load(os.path.join(work, 'singleFrame_results.npz'))
    lstm = Results.load(os.path.join(work, 'lstm_results.npz'))
    both = on_common_clips(single, lstm)
    classes, before, after = single.classes, both[0].per_class(), both[1].per_class()
    summary = dict(seconds=round(seconds, 1), step_seconds={k: round(v, 1) for k, v in times.items()},
                   single_frame=single.topk(), lstm=lstm.topk(),
                   per_class={c: dict(single_frame=round(float(b), 3), lstm=round(float(a), 3))
                              for c, b, a in zip(classes, before, after)})
    with open(os.path.join(work, 'demo_summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print('\n' + '=' * 78)
    print(f'Demo finished in {seconds:.0f}s; everything is in {work}/')
    print(f'single frame {format_accuracy(summary["single_frame"])}')
    print(f'LSTM         {format_accuracy(summary["lstm"])}')
    print('per-class accuracy, single frame -> LSTM (motion pairs differ only by motion):')
    for c in sorted(classes, key=lambda c: -(summary['per_class'][c]['lstm'] - summary['per_class'][c]['single_frame'])):
        pc = summary['per_class'][c]
        print(f'  {c:22s} {pc["single_frame"]:.2f} -> {pc["lstm"]:.2f}')
    print(f'plots and tables: {work}/report/ (confusion matrices, improvement.md/.png), '
          f'{work}/result_frame/ and {work}/result_lstm/ (training curves)')
    print('per-step times: ' + ', '.join(f'{k} {v:.0f}s' for k, v in times.items()))
    return summary


if __name__ == '__main__':
    main()
