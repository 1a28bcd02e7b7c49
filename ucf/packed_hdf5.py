"""The packed feature files (HDF5) that Parts 2 and 3 share: what is in them and how to read and write them.

A packed file holds one float32 dataset per clip (frames x dims), named by the clip's path without its extension
('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01'), with the clip's label as an attribute; `_index/` holds the clip
names, labels and class names in order (13,320 names overflow HDF5's 64 KiB attribute limit); the file's
attributes give the split, the subset ('train'/'test'), the kind ('features', 'predictions', 'normalized
features'), the sizes, and the provenance record of what made it. save_hdf5.py writes the first three,
normalizeData.py the normalised ones; singleFrameAccuracy.py and rnn.py read them.
"""
import os
import re

import h5py
import numpy as np

from ucf.errors import DataError
from ucf.files import atomic_path, run_isolated
from ucf.provenance import parse_provenance
from ucf.runcontrol import Progress


def write_packed(out_path, items, total, classes, **attrs):
    """Write (name, label, frames x dims array) items as one HDF5 file, one dataset per clip, atomically.
    Where `items` has a `left_out` list (filled while it is iterated), those clip names are recorded too.

    Returns (clips written, frames written). Used here and by normalizeData.py, so both files look the same.
    """
    with atomic_path(out_path, remove_stale=True) as tmp:
        return run_isolated(_write_hdf5, tmp, items, total, classes, attrs, os.path.basename(out_path))


def _write_hdf5(tmp, items, total, classes, attrs, title):
    progress = Progress(total, 'clips', f'{title}: ', interval=5)
    names, labels, frames, dim = [], [], 0, None
    with open_hdf5(tmp, 'w') as f:
        for name, label, array in items:
            dataset = f.create_dataset(name, data=array.astype(np.float32, copy=False))
            dataset.attrs['label'] = label
            names.append(name)
            labels.append(label)
            frames += array.shape[0]
            dim = array.shape[1]
            progress.update()
        # The clip list is too long for an HDF5 attribute (64 KiB) at full scale: it is a dataset.
        f['_index/clips'] = np.array(names, dtype=h5py.string_dtype())
        f['_index/labels'] = np.array(labels, np.int32)
        f['_index/classes'] = np.array(classes, dtype=h5py.string_dtype())
        left_out = getattr(items, 'left_out', None)  # clips the writer chose not to write (normalizeData: NaN/inf)
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


def read_clip(f, name):
    """(frames x dims array, label) of one clip of an open packed file."""
    dataset = f[name]
    return dataset[()], int(dataset.attrs['label'])


def read_hdf5_header(path, expect_split=None, expect_subset=None):
    """The attributes of a packed file, checked against what the caller expects (split, subset)."""
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


def file_provenance(path, header=None):
    """The provenance record of a packed file (its path added); {'source': 'unknown'} for files from before."""
    header = header or read_hdf5_header(path)
    return dict(parse_provenance(header.get('provenance')), path=os.path.abspath(path))
