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

import h5py
import numpy as np

from ucf.errors import DataError, warn
from ucf.files import atomic_path, check_writable, ensure_space, refuse_overwriting_inputs
from ucf.flags import HelpFormatter
from ucf.packed_hdf5 import file_provenance, read_hdf5_header, write_packed
from ucf.provenance import feature_size_mismatch, make_provenance, provenance_text, same_extraction
from ucf.runcontrol import Progress, exit_on_user_error


def report_nonfinite(path, name):
    warn(f'{path}: clip {name} holds NaN or inf; it is left out')


def feature_statistics(path, clips):
    """(mean, std, frames, usable clips) over all frames of `clips`, streamed clip by clip; a clip holding NaN or
    inf is reported and left out, in the same pass.

    Each clip is shifted by its first frame (float32; exact where a value is within a factor of two of it), and
    the sums of the shifted values and of their squares are accumulated in float64: the deviations are small,
    so the clip's second moment does not cancel. The clips are merged with Chan et al.'s pairwise update. A
    clip's sums are finite exactly when all of its values are, so they are the NaN/inf check too. Four passes
    over each clip in float32, where centring in float64 took six over twice the bytes."""
    count, mean, m2, usable = 0, None, None, []
    progress = Progress(len(clips), 'clips', 'statistics: ', interval=5)
    work = None
    with h5py.File(path, 'r') as f:
        for name in clips:
            x = f[name][()]
            progress.update()
            if work is None or work.shape[0] < x.shape[0]:
                work = np.empty((max(x.shape[0], 1024), x.shape[1]), np.float32)
            n, shift = x.shape[0], x[0].astype(np.float64)
            with np.errstate(over='ignore', invalid='ignore'):
                d = np.subtract(x, x[0], out=work[:n])
                total = d.sum(axis=0, dtype=np.float64)
                squares = np.multiply(d, d, out=d).sum(axis=0, dtype=np.float64)
            if not (np.isfinite(total).all() and np.isfinite(squares).all() and np.isfinite(shift).all()):
                report_nonfinite(path, name)
                continue
            usable.append(name)
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
        raise DataError(f'{path}: no usable training frames')
    return mean, np.sqrt(m2 / count), count, usable


class NormalizedItems:
    """(name, label, normalised frames) of each clip, in float32 and in place; clips holding NaN or inf are
    reported and left out, and named in `left_out` for the packed file's index (`checked`: the statistics pass
    found these clips finite already). The labels come from the file's index (`labels`: name -> label; reading
    each dataset's attribute costs ~0.2 ms a clip)."""

    def __init__(self, path, clips, labels, mean, std, checked=False, left_out=()):
        self.path, self.clips, self.labels, self.checked = path, clips, labels, checked
        self.mean, self.std, self.left_out = mean.astype(np.float32), std.astype(np.float32), list(left_out)

    def __iter__(self):
        with h5py.File(self.path, 'r') as f:
            for name in self.clips:
                x, label = f[name][()], self.labels[name]
                if not self.checked and not np.isfinite(x).all():
                    report_nonfinite(self.path, name)
                    self.left_out.append(name)
                    continue
                x -= self.mean
                x /= self.std
                yield name, label, x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--train', default='train1024.hdf5')
    p.add_argument('--test', default='test1024.hdf5')
    p.add_argument('--train-out', default='train1024_norm.hdf5')
    p.add_argument('--test-out', default='test1024_norm.hdf5')
    p.add_argument('--stats', default='feature_stats1024.npz')
    args = p.parse_args(argv)
    with exit_on_user_error():
        outputs = {'--train-out': args.train_out, '--test-out': args.test_out, '--stats': args.stats}
        refuse_overwriting_inputs({'--train': args.train, '--test': args.test}, outputs)
        check_writable({flag: (path, False) for flag, path in outputs.items()})
        train = read_hdf5_header(args.train, expect_subset='train')
        test = read_hdf5_header(args.test, expect_split=train['split'], expect_subset='test')
        sources = {path: file_provenance(path, header) for path, header in ((args.train, train), (args.test, test))}
        same_extraction(sources[args.train], sources[args.test], args.train, args.test,
                        'pack both from one extraction (save_hdf5.py)')
        if train['dim'] != test['dim']:
            raise DataError(feature_size_mismatch(args.train, train['dim'], args.test, test['dim']))
        mean, std, count, train_clips = feature_statistics(args.train, train['clips'])
        test_clips = test['clips']
        constant = std < 1e-6
        if constant.any():
            warn(f'{int(constant.sum())} of {len(std)} feature dimensions never vary in the training set '
                 '(dead fc7 units); they normalise to 0')
        safe_std = np.where(constant, 1.0, std)
        with atomic_path(args.stats) as tmp, open(tmp, 'wb') as f:
            np.savez(f, mean=mean.astype(np.float32), std=safe_std.astype(np.float32), frames=count,
                     constant=constant)
        for source, out, header, clips in ((args.train, args.train_out, train, train_clips),
                                           (args.test, args.test_out, test, test_clips)):
            ensure_space(out, os.path.getsize(source))
            record = make_provenance('normalizeData.py', input=sources[source],
                                     statistics=dict(path=os.path.abspath(args.train), frames=int(count)))
            labels = dict(zip(header['clips'], (int(label) for label in header['labels'])))
            kept = set(clips)  # the training clips the statistics pass found finite; every test clip
            items = NormalizedItems(source, clips, labels, mean, safe_std, checked=source == args.train,
                                    left_out=[c for c in header['clips'] if c not in kept])
            n_clips, n_frames = write_packed(out, items, len(clips),
                                             header['classes'], split=header['split'], subset=header['subset'],
                                             kind='normalized features', provenance=provenance_text(record))
            print(f'wrote {out}: {n_clips} clips, {n_frames} frames'
                  + (f' ({len(header["clips"]) - n_clips} left out)' if n_clips < len(header['clips']) else ''),
                  file=sys.stderr)
    print(f'statistics of {count} training frames in {args.stats}', file=sys.stderr)


if __name__ == '__main__':
    main()
