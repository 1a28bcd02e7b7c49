"""Provenance: every output records what made it (a JSON record; downstream records nest their inputs' records),
the code that ran, digests of weights, and the refusal of inputs that descend from different extractions. Which
extraction wrote each clip's files is the extraction store's manifest (ucf/extraction.py)."""
import glob
import os
import subprocess

import numpy as np

from ucf.errors import DataError


_CODE = []


def code_version():
    """The code that ran: a digest of the project's .py files (the steps and this package), and its git commit
    where it is a checkout."""
    if not _CODE:
        import hashlib
        folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        digest = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(folder, '*.py')) + glob.glob(os.path.join(folder, 'ucf', '*.py'))):
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
        commit = ''
        if os.path.isdir(os.path.join(folder, '.git')):
            try:
                commit = subprocess.run(['git', '-C', folder, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):  # no git on this node: the digest says it all
                pass
        _CODE.append(f'py:{digest.hexdigest()[:12]}' + (f' git:{commit}' if commit else ''))
    return _CODE[0]


def array_digest(arrays):
    """A digest of named arrays (a model's weights): computed once when a file is written, then read from it."""
    import hashlib
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f'{name}:{array.dtype.str}:{array.shape}'.encode())
        digest.update(memoryview(array).cast('B'))
    return digest.hexdigest()[:16]


def make_provenance(step, **fields):
    """What made an output: the step, the code, and the step's inputs and settings (no time stamp: the same
    inputs and code give the same record, so a rerun rewrites identical files)."""
    return dict(step=step, code=code_version(), **fields)


def provenance_text(record):
    import json
    return json.dumps(record, sort_keys=True)


def parse_provenance(text):
    """A provenance record from its stored text; files written before records existed give {'source': text}."""
    import json
    text = '' if text is None else str(text)
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {'source': text or 'unknown'}


def extraction_of(record):
    """The extraction record a downstream record descends from (None if it has none)."""
    if not isinstance(record, dict):
        return None
    if record.get('step') == 'saveFeatures_1024.py':
        return record
    for value in record.values():
        found = extraction_of(value)
        if found:
            return found
    return None


def same_extraction(first, second, first_path, second_path, advice):
    """The extraction records two inputs descend from; DataError when both are recorded and differ (another model,
    split or preprocessing), which would make using them together meaningless."""
    a, b = extraction_of(first), extraction_of(second)
    if a and b and a.get('tag') != b.get('tag'):
        raise DataError(f'{first_path} comes from {describe_extraction(a)} but {second_path} from '
                        f'{describe_extraction(b)}; {advice}')
    return a, b


def feature_size_mismatch(first, first_dim, second, second_dim):
    """The refusal for two feature files of different widths, with what to do about it."""
    return (f'{first} holds {first_dim}-d features but {second} {second_dim}-d: they come from models with '
            'different fc7 sizes (frameBasedTrain.py --feature-size). Extract both subsets with one model '
            '(saveFeatures.sh), pack them together (save_hdf5.py) and normalise them together (normalizeData.py)')


def describe_extraction(record):
    if not record:
        return 'no recorded extraction (written before provenance was recorded)'
    model = record.get('model', {})
    trained_on = model.get('split')
    stream = f' of the {record["stream"]} stream' if record.get('stream') else ''
    return (f'extraction {record.get("tag")}{stream} (model {model.get("path", "?")} digest '
            f'{model.get("digest", "?")}, fine-tuned on '
            f'{"an unrecorded split" if trained_on is None else f"split {trained_on}"}; features of '
            f'split {record.get("split")})')
