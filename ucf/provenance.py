"""Provenance: every output records what made it (a JSON record; downstream records nest their inputs' records),
digests of weights and files, and the extraction manifest that says which extraction wrote each clip's files."""
import contextlib
import glob
import os
import subprocess

import numpy as np

from helperFunctions import clip_stem
from ucf.errors import DataError
from ucf.files import _host, atomic_path, file_digest


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
    return (f'extraction {record.get("tag")} (model {model.get("path", "?")} digest {model.get("digest", "?")}, '
            f'fine-tuned on {"an unrecorded split" if trained_on is None else f"split {trained_on}"}; features of '
            f'split {record.get("split")})')


class ExtractionManifest:
    """Which extraction wrote each clip's feature and prediction files.

    `<features dir>/.extractions/<tag>.json` holds an extraction's record; each job appends one line per finished
    clip to its own `<tag>.<host>.<pid>.tsv`, with the size, modification time and content digest of both files
    (the digest of the bytes as they were written). A line counts while both files still have that size and
    time: a stat per file, no reading. A file whose time changed but whose size did not (copied with `cp -r`, or
    moved between file systems without keeping times) is read once and counts if its content has the recorded
    digest; a line with the new time is then added, so the next check is a stat again. Anything rewritten by
    another run (or half-way through a kill) is never taken for this extraction's.
    """

    KINDS = ('features', 'predictions')  # the two files of a clip, in the order of paths() and of a line's stamps

    def __init__(self, features_dir, predictions_dir):
        self.features_dir, self.predictions_dir = features_dir, predictions_dir
        self.folder = os.path.join(features_dir, '.extractions')
        self._entries, self._log, self._tag = None, None, None

    def paths(self, clip_path):
        stem = clip_stem(clip_path) + '.npy'
        return os.path.join(self.features_dir, stem), os.path.join(self.predictions_dir, stem)

    def _stamps(self, clip_path):
        """[(size, modification time) of the feature file, of the prediction file], None for a missing one."""
        stamps = []
        for path in self.paths(clip_path):
            try:
                s = os.stat(path)
                stamps.append((str(s.st_size), str(s.st_mtime_ns)))
            except OSError:
                stamps.append(None)
        return stamps

    def records(self):
        """{tag: extraction record} of every extraction that wrote into these folders."""
        import json
        found = {}
        for path in glob.glob(os.path.join(self.folder, '*.json')):
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    found[os.path.basename(path)[:-5]] = json.load(f)
        return found

    def entries(self):
        """{clip path: {tag: [(size, time, digest) per kind]}} from every job's lines; a line cut short by a kill
        is ignored, and lines written before digests were recorded have digest ''."""
        if self._entries is None:
            self._entries = {}
            for path in glob.glob(os.path.join(self.folder, '*.tsv')):
                tag = os.path.basename(path).split('.', 1)[0]
                with open(path, errors='replace') as f:
                    for line in f:
                        parts = line.rstrip('\n').split('\t')
                        if not line.endswith('\n') or len(parts) not in (5, 7):
                            continue
                        width = (len(parts) - 1) // 2
                        kinds = [tuple(parts[1 + width * i:1 + width * (i + 1)]) for i in range(2)]
                        self._entries.setdefault(parts[0], {})[tag] = [(*k, '')[:3] for k in kinds]
        return self._entries

    def _match(self, clip_path, recorded, kinds):
        """'same' when the files of these kinds are the recorded ones by size and time, 'copied' when only their
        content digest says so, else why not ('rewritten', 'missing', 'undated copy')."""
        current, paths, verdict = self._stamps(clip_path), self.paths(clip_path), 'same'
        for i, kind in enumerate(self.KINDS):
            if kind not in kinds:
                continue
            size, stamp, digest = recorded[i]
            if current[i] is None:
                return 'missing'
            if current[i] == (size, stamp):
                continue
            if current[i][0] != size:
                return 'rewritten'
            if not digest:
                return 'undated copy'
            if file_digest(paths[i]) != digest:
                return 'rewritten'
            verdict = 'copied'
        return verdict

    def tag_of(self, clip_path, kinds=KINDS):
        """The extraction whose files (of these kinds) are in place for this clip now, or None."""
        for tag, recorded in self.entries().get(clip_path, {}).items():
            verdict = self._match(clip_path, recorded, kinds)
            if verdict == 'copied':
                self._restamp(clip_path, tag, recorded, kinds)
            if verdict in ('same', 'copied'):
                return tag
        return None

    def why_not(self, clip_path, kinds=KINDS):
        """Why no extraction accounts for this clip's files (for a clip tag_of() gave None)."""
        verdicts = {self._match(clip_path, recorded, kinds)
                    for recorded in self.entries().get(clip_path, {}).values()}
        if not verdicts:
            return 'no record of the extraction that wrote them (an older version of this code, or by hand)'
        if 'undated copy' in verdicts:
            return ('their modification times differ from the recorded ones while their sizes match (copied '
                    'without keeping times?), and their record predates content digests, so the copy cannot be '
                    'checked: copy them again with `cp -p`/`rsync -a` from the original, or re-extract them')
        return 'changed since the extraction that wrote them recorded them (rewritten by another run or by hand)'

    def _restamp(self, clip_path, tag, recorded, kinds):
        """Add a line with the new times of the copied files of these kinds, just checked by digest (a kind not
        checked keeps its recorded time, to be checked when asked for), so that the next check is a stat again.
        Best effort: on a read-only copy the digests are simply checked again next time."""
        current = self._stamps(clip_path)
        fields = [clip_path]
        for kind, now, (size, stamp, digest) in zip(self.KINDS, current, recorded):
            fields += [*(now if kind in kinds and now else (size, stamp)), digest]
        with contextlib.suppress(OSError):
            with open(os.path.join(self.folder, f'{tag}.{_host()}.{os.getpid()}.tsv'), 'a') as f:
                f.write('\t'.join(fields) + '\n')
        self.entries()[clip_path][tag] = [tuple(fields[1 + 3 * i:4 + 3 * i]) for i in range(2)]

    def start(self, record):
        """Record this extraction (its tag names the record) before writing any clip."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f'{record["tag"]}.json')
        if not os.path.isfile(path):
            with atomic_path(path) as tmp, open(tmp, 'w') as f:
                f.write(provenance_text(record))
        self._log = os.path.join(self.folder, f'{record["tag"]}.{_host()}.{os.getpid()}.tsv')
        self._tag = record['tag']

    def add(self, clip_path, digests):
        """Note that this clip's two files, just renamed into place, are this extraction's; `digests` are those
        of their bytes (features, predictions) as save_npy_atomic wrote them."""
        fields = [clip_path]
        for stamp, digest in zip(self._stamps(clip_path), digests):
            fields += [*stamp, digest]
        with open(self._log, 'a') as f:  # one short write in append mode: whole lines even with other writers
            f.write('\t'.join(fields) + '\n')
        if self._entries is not None:
            self._entries.setdefault(clip_path, {})[self._tag] = [tuple(fields[1 + 3 * i:4 + 3 * i])
                                                                  for i in range(2)]
