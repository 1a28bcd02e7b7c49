"""VGG16's thirteen 3x3 convolutions (+ ReLU) one by one at 224x224: fast_conv, stock Chainer and PyTorch.

    python tools/bench_layers.py                 # batch 8, all three
    python tools/bench_layers.py --batch 1 --no-stock

Prints milliseconds and GFLOP/s per layer, to see where a whole-network difference comes from. Each layer's time
is the best of --repeat runs after a warm-up; the implementations alternate layer by layer, so that a noisy
minute on a shared machine hits all of them. fast_conv's layers are timed as they run in extraction (its fused,
graph-free pass), each from its input in fast_conv's padded layout; PyTorch's run in .venv-torch (see bench.py).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: its steps and ucf/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import numpy as np


TORCH_LAYER = r'''
import json, sys, time, torch
c, o, s, batch, repeat = map(int, sys.argv[1:6])
x, conv = torch.randn(batch, c, s, s), torch.nn.Conv2d(c, o, 3, padding=1)
def run():
    with torch.no_grad():
        torch.relu(conv(x))
run(); times = []
for _ in range(repeat):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
print(json.dumps(min(times)))
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batchsize', '-b', type=int, default=8)
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--no-stock', action='store_true', help="skip stock Chainer (slow at batch 8)")
    p.add_argument('--no-torch', action='store_true')
    args = p.parse_args(argv)
    import chainer
    import chainer.functions as F
    from ucf import fast_conv
    from tools import bench
    from VGGNet import BLOCKS, CONV_LAYERS, WIDTHS
    layers, channels, size = [], 3, 224  # (in channels, out channels, size) of conv1_1 ... conv5_3
    for width, n in zip(WIDTHS, BLOCKS):
        for _ in range(n):
            layers.append((channels, width, size))
            channels = width
        size //= 2
    torch_python = None if args.no_torch else bench.torch_python()
    rng = np.random.RandomState(0)
    names = ['fast_conv'] + ([] if args.no_stock else ['stock']) + (['PyTorch'] if torch_python else [])
    totals = dict.fromkeys(names, 0.0)
    print(f'batch {args.batchsize}; ms and GFLOP/s per layer (conv + ReLU)')
    print('layer   channels size | ' + ' | '.join(f'{n:>17}' for n in names))
    gflop_total = 0
    for layer, (c, o, s) in zip(CONV_LAYERS, layers):
        x = rng.normal(0, 1, (args.batchsize, c, s, s)).astype(np.float32)
        W = (rng.normal(size=(o, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
        b = rng.normal(0, 0.1, o).astype(np.float32)
        gflop = 2 * args.batchsize * o * c * 9 * s * s / 1e9
        gflop_total += gflop
        rows = fast_conv._padded_rows(x)
        out = np.empty((o, rows.shape[1]), np.float32)

        def fast():
            fast_conv._correlate(rows, W, args.batchsize, s, s, out, bias=b, relu=True)
            fast_conv._zero_padding(out, args.batchsize, s, s)

        def stock():
            with chainer.no_backprop_mode():
                F.relu(F.convolution_2d(x, W, b, pad=1))
        seconds = {'fast_conv': bench.best_time(fast, args.repeat)}
        if 'stock' in names:
            seconds['stock'] = bench.best_time(stock, args.repeat)
        if torch_python:
            result = subprocess.run([torch_python, '-c', TORCH_LAYER, str(c), str(o), str(s), str(args.batchsize),
                                     str(args.repeat)], capture_output=True, text=True, check=True)
            seconds['PyTorch'] = json.loads(result.stdout)
        for name, t in seconds.items():
            totals[name] += t
        print(f'{layer:<7} {c:>3}->{o:<3} {s:>3} | '
              + ' | '.join(f'{seconds[n] * 1e3:7.1f} ms {gflop / seconds[n]:4.0f} GF' for n in names), flush=True)
    print(f'all {len(layers)}                | ' + ' | '.join(f'{totals[n] * 1e3:7.0f} ms {gflop_total / totals[n]:4.0f} GF'
                                             for n in names))


if __name__ == '__main__':
    main()
