"""The whole pipeline on the built-in synthetic UCF-101, with the real scripts, in the handout's order; then the
motion stream beside it (optical flow), and both fused.

    make demo            (or: .venv/bin/python demo.py --out demo)

What differs from a real run, to finish in a few minutes on 2 CPU cores: 8 classes instead of 101 (4 recognisable
from one frame, 2 pairs that differ only in motion), 160x120 clips of 30-80 frames, a randomly initialised
VGG16-shaped network (narrow, 32x32 inputs; no ImageNet weights can be downloaded here), a 128-d fc7 instead of
1024, and a shorter LSTM schedule. The flow network learns from fc6 up (on a real run every layer learns), with
flows clipped at 2 pixels of its 32x32 input, and is not flipped: SlideLeft and SlideRight are each other's
mirror images, so a flipped stack of one is the other (UCF-101's classes are not). Every script, file format and
step is the real one.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from ucf.runcontrol import usable_cpus


HERE = os.path.dirname(os.path.abspath(__file__))
LSTM_FLAGS = ('--epoch', '30', '--seqlen', '32', '--bptt', '8', '--hidden', '128', '--fc', '128', '--batchsize', '16',
              '--dropout', '0.3', '--in-memory', '--inference', 'full', 'segments', 'last')


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
    times['lstm'] = step('Part 3: LSTM (rnn.py)', 'rnn.py', *LSTM_FLAGS, cwd=work)
    times['report'] = step('Part 3: comparison report (confusion.py)', 'confusion.py', '--top', '5', cwd=work)
    times['flow finetune'] = step('Flow stream: fine-tune on flow stacks (frameBasedTrain.py --stream flow)',
                                  'frameBasedTrain.py', '--stream', 'flow', '--epoch', '30', '--batchsize', '16', '--lr',
                                  '0.003', '--dropout', '0.2', '--feature-size', '128', '--train-from', 'fc6',
                                  '--flow-bound', '2', '--no-flip', '--log-interval', '50', '--loaderjob', '0',
                                  '--cache-mb', '3000', '--conv', 'fast', cwd=work)
    times['flow extract'] = step('Flow stream: extract, 3 shards (saveFeatures.sh -- --stream flow)', 'generate_pbs.py',
                                 '--scheduler', 'local', '--num-shards', '3', '--', '--stream', 'flow', '--batchsize',
                                 '64', '--conv', 'fast', cwd=work)
    times['flow pack'] = step('Flow stream: pack and normalise', 'save_hdf5.py', '--stream', 'flow', cwd=work)
    times['flow pack'] += step('Flow stream: normalise', 'normalizeData.py', '--stream', 'flow', cwd=work)
    times['flow single'] = step('Flow stream: single-frame accuracy', 'singleFrameAccuracy.py', '--stream', 'flow',
                                cwd=work)
    times['two-stream single'] = step('Two-stream: single frames fused', 'singleFrameAccuracy.py', '--stream',
                                      'two-stream', cwd=work)
    times['two-stream lstm'] = step('Two-stream: the LSTM on both streams\' features', 'rnn.py', '--stream',
                                    'two-stream', *LSTM_FLAGS, cwd=work)
    times['flow report'] = step('Which classes the flow stream improves (confusion.py --compare)', 'confusion.py',
                                '--compare', 'singleFrame_results.npz', 'singleFrame_results_twostream.npz',
                                '--top', '5', cwd=work)
    clips = [first_test_clip(work, name) for name in ('SlideLeft', 'Grow')]
    times['classify'] = step('Classify a test clip of each motion pair (classifyVideo.py)', 'classifyVideo.py',
                             *clips, '--stream', 'two-stream', '--annotate', 'classified', '--out', 'classified',
                             cwd=work)
    summarize(work, time.time() - started, times)


def first_test_clip(work, class_name):
    """The path of the first test clip of a class in split 1's list."""
    with open(os.path.join(work, 'ucfTrainTestlist', 'testlist01.txt')) as f:
        return next(os.path.join('UCF-101', line.strip()) for line in f if line.startswith(class_name + '/'))


# The results the demo ends with, in the handout's form: (label, file).
RESULTS = [('RGB single frame', 'singleFrame_results.npz'), ('flow single frame', 'singleFrame_results_flow.npz'),
           ('two-stream single frame', 'singleFrame_results_twostream.npz'), ('RGB LSTM', 'lstm_results.npz'),
           ('two-stream LSTM', 'lstm_results_twostream.npz')]


def summarize(work, seconds, times):
    sys.path.insert(0, HERE)
    from ucf.results import Results, format_accuracy, on_common_clips
    results = {label: Results.load(os.path.join(work, name)) for label, name in RESULTS}
    single, lstm = on_common_clips(results['RGB single frame'], results['RGB LSTM'])
    classes = single.classes
    per_class = {label: dict(zip(classes, on_common_clips(r, single)[0].per_class()))
                 for label, r in results.items()}
    pairs = [c for c in classes if c in ('SlideLeft', 'SlideRight', 'Grow', 'Shrink')]
    summary = dict(seconds=round(seconds, 1), step_seconds={k: round(v, 1) for k, v in times.items()},
                   single_frame=results['RGB single frame'].topk(), lstm=results['RGB LSTM'].topk(),
                   per_class={c: dict(single_frame=round(float(per_class['RGB single frame'][c]), 3),
                                      lstm=round(float(per_class['RGB LSTM'][c]), 3)) for c in classes},
                   streams={label: dict(accuracy=r.topk(), motion_pairs=round(float(np.mean(
                       [per_class[label][c] for c in pairs])), 3)) for label, r in results.items()})
    with open(os.path.join(work, 'demo_summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print('\n' + '=' * 78)
    print(f'Demo finished in {seconds:.0f}s; everything is in {work}/')
    for label, stream in summary['streams'].items():
        print(f'{label:24s} {format_accuracy(stream["accuracy"])}   motion pairs {stream["motion_pairs"]:.2f}')
    print('per-class accuracy (motion pairs differ only by motion): RGB single frame -> RGB LSTM; flow single frame; '
          'two-stream single frame')
    for c in sorted(classes, key=lambda c: -(summary['per_class'][c]['lstm'] - summary['per_class'][c]['single_frame'])):
        pc = summary['per_class'][c]
        print(f'  {c:22s} {pc["single_frame"]:.2f} -> {pc["lstm"]:.2f}; {per_class["flow single frame"][c]:.2f}; '
              f'{per_class["two-stream single frame"][c]:.2f}')
    print(f'plots and tables: {work}/report/ (confusion matrices, improvement.md/.png, and the flow stream\'s '
          f'improvement_singleFrame_to_singleFrame_twostream.md/.png), {work}/result_frame/, result_frame_flow/, '
          f'result_lstm/ and result_lstm_twostream/ (training curves); two test clips classified, their '
          f'probabilities along them and the clips with their predictions drawn: {work}/classified/ (.png, .mp4)')
    print('per-step times: ' + ', '.join(f'{k} {v:.0f}s' for k, v in times.items()))
    return summary


if __name__ == '__main__':
    main()
