"""The packed feature files (HDF5) that Parts 2 and 3 share: what is in them, how to write them, and `PackedFile`,
the one reader, which refuses a wrong file where it is opened.

A packed file holds one float32 dataset per clip (frames x dims), named by the clip's path without its extension
('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01'), with the clip's label as an attribute; `_index/` holds the clip
names, labels and class names in order (13,320 names overflow HDF5's 64 KiB attribute limit), and the clips the
writer left out; the file's attributes give the split, the subset ('train'/'test'), the kind (KINDS), the sizes,
and the provenance record of what made it. save_hdf5.py writes the first two kinds, normalizeData.py the third;
normalizeData.py, singleFrameAccuracy.py and rnn.py read them.
"""
import os
import re

import h5py
import numpy as np

from ucf.errors import DataError
from ucf.files import atomic_path, read_npz, run_isolated
from ucf.provenance import (array_digest, extraction_of, feature_size_mismatch, parse_provenance, provenance_text,
                            same_extraction)
from ucf.runcontrol import Progress

# What each kind of packed file holds, its usual names and the step that writes it (refusals say what to pass).
KINDS = {'features': ('fc7 features', 'train1024.hdf5 or test1024.hdf5', 'save_hdf5.py'),
         'predictions': ('per-frame predictions', 'testPredictions1024.hdf5', 'save_hdf5.py'),
         'normalized features': ('normalised fc7 features', 'train1024_norm.hdf5 or test1024_norm.hdf5',
                                 'normalizeData.py')}


class PackedFile:
    """A packed file opened for reading, checked to be what the caller expects: its `kind` (one of KINDS, or a
    tuple of those it accepts), `subset`, `split` and `stream` (whose extraction it descends from). Holds the clip
    names, labels and class names, the width (`dim`), the clips its writer left out and its provenance `record`;
    `read(i)` gives clip i's frames x dims array, `items()` every clip in order. With `finite`, a clip holding NaN
    or inf is refused where it is read. The handle is opened per process (an h5py handle must not cross a fork),
    so loader processes may read too.
    """

    def __init__(self, path, kind=None, subset=None, split=None, finite=False, in_memory=False, stream=None):
        header = read_hdf5_header(path, expect_split=split, expect_subset=subset)
        self.path, self.kind, self.finite = path, header.get('kind'), finite
        accepted = (kind,) if isinstance(kind, str) else kind
        if accepted and self.kind not in accepted:
            held = KINDS[self.kind][0] if self.kind in KINDS else repr(self.kind) if self.kind else 'unrecorded data'
            wanted, names, writer = KINDS[accepted[0]]
            raise DataError(f'{path} holds {held}, not {wanted}; pass {names} ({writer})')
        self.names, self.labels = header['clips'], np.asarray(header['labels'], np.int32)
        self.classes, self.dim = header['classes'], int(header['dim'])
        self.split, self.subset, self.left_out = int(header['split']), header['subset'], header['left_out']
        self.record = dict(parse_provenance(header.get('provenance')), path=os.path.abspath(path))
        self.stream = (extraction_of(self.record) or {}).get('stream', 'rgb')
        if stream is not None and self.stream != stream:
            raise DataError(f'{path} holds the {self.stream} stream\'s {KINDS.get(self.kind, ("data",))[0]}, not the '
                            f'{stream} stream\'s: pass --stream {self.stream}, or the {stream} stream\'s file')
        self._file, self._pid, self._cache = None, None, None
        if in_memory:
            self._cache = [self.read(i) for i in range(len(self))]

    def __len__(self):
        return len(self.names)

    def _handle(self):
        if self._pid != os.getpid():
            self._file, self._pid = open_hdf5(self.path, 'r'), os.getpid()
        return self._file

    def read(self, i):
        """Clip i's frames x dims array (float32)."""
        if self._cache is not None:
            return self._cache[i]
        x = self._handle()[self.names[i]][()]
        if self.finite and not np.isfinite(x).all():
            writer = KINDS[self.kind][2] if self.kind in KINDS else 'the step that wrote it'
            raise DataError(f'{self.path}: clip {self.names[i]} holds NaN or inf; rerun {writer}')
        return x

    def items(self):
        """(name, label, frames x dims array) of every clip, in the file's order."""
        for i, name in enumerate(self.names):
            yield name, int(self.labels[i]), self.read(i)

    def lengths(self):
        """Frames per clip (from the datasets' shapes: nothing is read)."""
        f = self._handle()
        return np.array([f[n].shape[0] for n in self.names])

    def check_together(self, other, advice):
        """DataError unless `other` can be used with this file: from one extraction (`advice` says how), over the
        same classes, of the same width."""
        same_extraction(self.record, other.record, self.path, other.path, advice)
        if self.classes != other.classes:
            raise DataError(f'{self.path} has {len(self.classes)} classes but {other.path} {len(other.classes)} (or '
                            'other names): pack both from one classInd.txt (save_hdf5.py writes them together)')
        if self.dim != other.dim:
            raise DataError(feature_size_mismatch(self.path, self.dim, other.path, other.dim))

    def check_aligned(self, other, only_common=False):
        """DataError unless `other` (another stream's file) holds the same split's same clips, classes and frame
        counts, so that its frame t goes with this file's frame t; `only_common`: the clips both hold (those one
        stream left out, normalizeData's NaN, are not refused)."""
        advice = 'extract, pack and normalise both streams from one split list (saveFeatures.sh, save_hdf5.py)'
        if (self.split, self.subset) != (other.split, other.subset):
            raise DataError(f'{self.path} holds the {self.subset} clips of split {self.split} but {other.path} the '
                            f'{other.subset} clips of split {other.split}: {advice}')
        if self.classes != other.classes:
            raise DataError(f'{self.path} and {other.path} name other classes: {advice}')
        only = sorted(set(self.names) ^ set(other.names))
        excused = set(self.left_out) | set(other.left_out) if only_common else set()
        if set(only) - excused or not only_common and self.names != other.names:
            raise DataError(f'{self.path} holds {len(self)} clips and {other.path} {len(other)}, not the same ones '
                            f'({len(only)} in one only, e.g. {only[0] if only else "in another order"}): {advice}')
        theirs = dict(zip(other.names, other.lengths()))
        differ = [(n, k, theirs[n]) for n, k in zip(self.names, self.lengths()) if n in theirs and theirs[n] != k]
        if differ:
            name, mine, their = differ[0]
            raise DataError(f'{len(differ)} clips have other frame counts in {self.path} than in {other.path} (e.g. '
                            f'{name}: {mine} and {their}): their frames cannot be paired; {advice}')


class FeatureStats:
    """The training set's per-dimension mean and standard deviation (feature_stats1024.npz): normalizeData.py
    writes it and normalises with it; anything that meets new features of the same extraction (classifyVideo.py)
    normalises them with it. `record` says what it was computed on; `digest` names its numbers, and the normalised
    files record it, so that features and statistics are never paired across extractions."""

    def __init__(self, mean, std, frames, constant, record=None):
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.frames, self.constant, self.record = int(frames), np.asarray(constant, bool), record or {}

    @property
    def digest(self):
        return array_digest(dict(mean=self.mean, std=self.std))

    def normalize(self, x):
        """Frames x dims features, normalised (float32, in place where `x` is float32)."""
        x = np.asarray(x, np.float32)
        x -= self.mean
        x /= self.std
        return x

    def save(self, path):
        with atomic_path(path) as tmp, open(tmp, 'wb') as f:
            np.savez(f, mean=self.mean, std=self.std, frames=self.frames, constant=self.constant,
                     provenance=np.array(provenance_text(self.record)))

    @classmethod
    def load(cls, path):
        stored = read_npz(path, 'normalisation statistics', 'normalizeData.py writes them (Part 2).')
        if not {'mean', 'std', 'frames'} <= set(stored):
            raise DataError(f'{path} holds no mean, std and frames: not the statistics normalizeData.py writes')
        record = parse_provenance(stored['provenance'][()]) if 'provenance' in stored else {}
        return cls(stored['mean'], stored['std'], stored['frames'], stored.get('constant', np.zeros(0, bool)),
                   record)


def write_packed(out_path, items, total, classes, **attrs):
    """Write (name, label, frames x dims array) items as one HDF5 file, one dataset per clip, atomically. An item
    whose array is None is a clip the writer left out (normalizeData.py: NaN or inf): its name is recorded.

    Returns (clips written, frames written). save_hdf5.py and normalizeData.py write with it, so both look alike.
    """
    with atomic_path(out_path, remove_stale=True) as tmp:
        return run_isolated(_write_hdf5, tmp, items, total, classes, attrs, os.path.basename(out_path))


def _write_hdf5(tmp, items, total, classes, attrs, title):
    progress = Progress(total, 'clips', f'{title}: ', interval=5)
    names, labels, left_out, frames, dim = [], [], [], 0, None
    with open_hdf5(tmp, 'w') as f:
        for name, label, array in items:
            progress.update()
            if array is None:
                left_out.append(name)
                continue
            dataset = f.create_dataset(name, data=array.astype(np.float32, copy=False))
            dataset.attrs['label'] = label
            names.append(name)
            labels.append(label)
            frames += array.shape[0]
            dim = array.shape[1]
        # The clip list is too long for an HDF5 attribute (64 KiB) at full scale: it is a dataset.
        f['_index/clips'] = np.array(names, dtype=h5py.string_dtype())
        f['_index/labels'] = np.array(labels, np.int32)
        f['_index/classes'] = np.array(classes, dtype=h5py.string_dtype())
        if left_out:
            f['_index/left_out'] = np.array(left_out, dtype=h5py.string_dtype())
        f.attrs.update(n_clips=len(names), n_frames=frames, dim=dim or 0, **attrs)
    return len(names), frames


def open_hdf5(path, mode):
    """h5py.File, with the one fix that shared file systems need said in one line."""
    try:
        return h5py.File(path, mode)
    except OSError as e:
        text = str(e).lower()
        truncated = re.search(r'truncated file: eof = (\d+).*stored_eof = (\d+)', text)
        if truncated:
            raise DataError(f'{path}: truncated: it holds {int(truncated.group(1)):,} of the '
                            f'{int(truncated.group(2)):,} bytes it was written with (a copy or a transfer that did '
                            'not finish?); copy it again, or make it again with the step that wrote it') from None
        if re.search(r'\b(un)?lock', text):  # "unable to lock file", not the "sblock" of a superblock message
            raise DataError(f'{path}: this file system refuses HDF5 file locks ({e}); run '
                            '`export HDF5_USE_FILE_LOCKING=FALSE` (in job scripts too) and rerun') from None
        raise


def read_hdf5_header(path, expect_split=None, expect_subset=None):
    """The attributes and index of a packed file, checked against what the caller expects (split, subset)."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: not found; make it with `python save_hdf5.py` (Part 2)')
    try:
        with open_hdf5(path, 'r') as f:
            attrs = {k: _plain(f.attrs[k]) for k in f.attrs}
            if '_index' in f:
                attrs.update(clips=[c.decode() for c in f['_index/clips'][()]],
                             labels=f['_index/labels'][()],
                             classes=[c.decode() for c in f['_index/classes'][()]],
                             left_out=[c.decode() for c in f['_index/left_out'][()]] if 'left_out' in f['_index']
                             else [])
    except OSError as e:
        raise DataError(f'{path}: not a readable HDF5 file ({e}); make it again with save_hdf5.py') from None
    for key, expected in (('split', expect_split), ('subset', expect_subset), ('clips', None)):
        if key not in attrs:
            raise DataError(f'{path}: no {key!r} attribute; was it written by save_hdf5.py?')
        if expected is not None and attrs[key] != expected:
            raise DataError(f'{path} holds {key} {attrs[key]!r}, not {expected!r}; pass the file of the right '
                            f'split, or --split {attrs[key]}' if key == 'split' else
                            f'{path} holds the {attrs[key]} clips, not the {expected} ones')
    return attrs


def _plain(value):
    """An attribute as Python holds it (numpy 2 writes a numpy scalar as np.int64(1) into messages)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value
