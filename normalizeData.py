"""Part 2: normalise the fc7 features with the training set's per-dimension mean and standard deviation.

    python normalizeData.py

reads train1024.hdf5 and test1024.hdf5, writes train1024_norm.hdf5 and test1024_norm.hdf5 (same layout) and
feature_stats1024.npz (mean, std, frame count). The statistics are accumulated clip by clip in float64
(each clip's sums, merged by Chan et al.'s pairwise update), so memory stays small at full scale. A dimension that never varies gets
std 1 (it normalises to 0, never NaN); a clip holding NaN or inf is reported and left out of both the statistics
and the output, so no NaN reaches a model.
"""
import ucf  # noqa: F401  (first: from here on a Ctrl-C is one line, while the libraries load too)
import argparse
import os
import sys

import numpy as np

from ucf.errors import DataError, warn
from ucf.files import check_outputs, ensure_space
from ucf.flags import HelpFormatter
from ucf.packed_hdf5 import FeatureStats, PackedFile, write_packed
from ucf.provenance import make_provenance, provenance_text
from ucf.runcontrol import Progress, exit_on_user_error
from ucf.streams import NETWORK_STREAMS, StreamPath, add_stream_flag, apply_stream


def report_nonfinite(path, name):
    warn(f'{path}: clip {name} holds NaN or inf; it is left out')


def feature_statistics(packed):
    """(mean, std, frames, clips left out) over all frames of a packed file's clips, streamed clip by clip; a clip
    holding NaN or inf is reported and left out, in the same pass.

    Each clip is shifted by its first frame (float32; exact where a value is within a factor of two of it), and
    the sums of the shifted values and of their squares are accumulated in float64: the deviations are small,
    so the clip's second moment does not cancel. The clips are merged with Chan et al.'s pairwise update. A
    clip's sums are finite exactly when all of its values are, so they are the NaN/inf check too. Four passes
    over each clip in float32, where centring in float64 took six over twice the bytes."""
    count, mean, m2, left_out = 0, None, None, set()
    progress = Progress(len(packed), 'clips', 'statistics: ', interval=5)
    work = None
    for name, _, x in packed.items():
        progress.update()
        if work is None or work.shape[0] < x.shape[0]:
            work = np.empty((max(x.shape[0], 1024), x.shape[1]), np.float32)
        n, shift = x.shape[0], x[0].astype(np.float64)
        with np.errstate(over='ignore', invalid='ignore'):
            d = np.subtract(x, x[0], out=work[:n])
            total = d.sum(axis=0, dtype=np.float64)
            squares = np.multiply(d, d, out=d).sum(axis=0, dtype=np.float64)
        if not (np.isfinite(total).all() and np.isfinite(squares).all() and np.isfinite(shift).all()):
            report_nonfinite(packed.path, name)
            left_out.add(name)
            continue
        clip_mean = shift + total / n
        clip_m2 = np.maximum(squares - total * total / n, 0.0)
        if mean is None:
            count, mean, m2 = n, clip_mean, clip_m2
        else:
            delta, merged = clip_mean - mean, count + n
            mean = mean + delta * n / merged
            m2 = m2 + clip_m2 + delta ** 2 * count * n / merged
            count = merged
    if not count:
        raise DataError(f'{packed.path}: no usable training frames')
    return mean, np.sqrt(m2 / count), count, left_out


def normalized_items(packed, stats, left_out=None):
    """(name, label, normalised frames) of each clip of a packed file, in float32 and in place; (name, label,
    None) for a clip left out (write_packed records it). `left_out`: the clips the statistics pass found NaN or
    inf in (every other one is finite); None: check each clip here, report and leave out the bad ones."""
    for name, label, x in packed.items():
        if name in left_out if left_out is not None else not np.isfinite(x).all():
            if left_out is None:
                report_nonfinite(packed.path, name)
            yield name, label, None
            continue
        yield name, label, stats.normalize(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_stream_flag(p, NETWORK_STREAMS)
    p.add_argument('--train', default=StreamPath('train1024.hdf5'))
    p.add_argument('--test', default=StreamPath('test1024.hdf5'))
    p.add_argument('--train-out', default=StreamPath('train1024_norm.hdf5'))
    p.add_argument('--test-out', default=StreamPath('test1024_norm.hdf5'))
    p.add_argument('--stats', default=StreamPath('feature_stats1024.npz'))
    args = apply_stream(p.parse_args(argv))
    with exit_on_user_error():
        check_outputs({'--train': args.train, '--test': args.test},
                      {'--train-out': args.train_out, '--test-out': args.test_out, '--stats': args.stats})
        train = PackedFile(args.train, kind='features', subset='train', stream=args.stream)
        test = PackedFile(args.test, kind='features', subset='test', split=train.split, stream=args.stream)
        train.check_together(test, 'pack both from one extraction (save_hdf5.py)')
        mean, std, count, left_out = feature_statistics(train)
        constant = std < 1e-6
        if constant.any():
            warn(f'{int(constant.sum())} of {len(std)} feature dimensions never vary in the training set '
                 '(dead fc7 units); they normalise to 0')
        stats = FeatureStats(mean, np.where(constant, 1.0, std), count, constant,
                             make_provenance('normalizeData.py', input=train.record))
        stats.save(args.stats)
        for packed, out, known in ((train, args.train_out, left_out), (test, args.test_out, None)):
            ensure_space(out, os.path.getsize(packed.path))
            record = make_provenance('normalizeData.py', input=packed.record,
                                     statistics=dict(path=os.path.abspath(args.train), frames=int(count),
                                                     digest=stats.digest))
            n_clips, n_frames = write_packed(out, normalized_items(packed, stats, known), len(packed),
                                             packed.classes, split=packed.split, subset=packed.subset,
                                             kind='normalized features', provenance=provenance_text(record))
            print(f'wrote {out}: {n_clips} clips, {n_frames} frames'
                  + (f' ({len(packed) - n_clips} left out)' if n_clips < len(packed) else ''), file=sys.stderr)
    print(f'statistics of {count} training frames in {args.stats}', file=sys.stderr)


if __name__ == '__main__':
    main()
