"""Running a long step: progress with rate and ETA, one-line errors and Ctrl-C, memory checks, resumable training
(RunRecord, resume_trainer), divergence, CPUs to use."""
import contextlib
import glob
import os
import sys
import time

import numpy as np

from ucf.errors import DataError, interrupted, say_interrupted, warn
from ucf.files import human_bytes
from ucf.flags import device_from_arg


def available_memory(device_spec='-1'):
    """(bytes this job can still allocate, where): the GPU's free memory for a CUDA --device; otherwise the
    machine's available memory, lowered to what a batch job's cgroup limit (Slurm's --mem) leaves."""
    spec = str(device_spec)
    if spec.lstrip('-').isdigit() and int(spec) >= 0 or spec.startswith('@cupy'):
        device = device_from_arg(spec)
        import cupy
        with cupy.cuda.Device(device.device.id):
            free, total = cupy.cuda.runtime.memGetInfo()
        return free + cupy.get_default_memory_pool().free_bytes(), f'GPU {device.device.id}'
    free = None
    with contextlib.suppress(OSError, ValueError):
        with open('/proc/meminfo') as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    if free is None:
        free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    where = 'this machine'
    with contextlib.suppress(OSError, ValueError):
        with open('/proc/self/cgroup') as f:
            group = next(line.strip().split(':', 2)[2] for line in f if line.startswith('0::'))
        folder = os.path.join('/sys/fs/cgroup', group.lstrip('/'))
        with open(os.path.join(folder, 'memory.max')) as f:
            limit = f.read().strip()
        if limit != 'max':
            with open(os.path.join(folder, 'memory.current')) as f:
                left = int(limit) - int(f.read())
            if left < free:
                free, where = left, "this job's memory limit"
    return max(free, 0), where


def check_memory(parts, device_spec, advice):
    """Refuse settings that cannot fit before allocating anything (they ended in a MemoryError traceback, or
    swapped the node to a halt). parts: {what: bytes}, a lower bound of what the run holds at once."""
    need = sum(parts.values())
    free, where = available_memory(device_spec)
    if need > free:
        detail = ', '.join(f'{what} {human_bytes(n)}' for what, n in sorted(parts.items(), key=lambda p: -p[1]))
        raise DataError(f'these settings need at least {human_bytes(need)} of memory ({detail}) but {where} has '
                        f'{human_bytes(free)} available; {advice}')


@contextlib.contextmanager
def exit_on_user_error():
    """Bad input, and output that cannot be written (full disk, quota, read-only or wrong folder), end the
    script with one line `error: ...` and exit status 1 instead of a traceback. Files are written atomically,
    so nothing incomplete is left under a final name. Ctrl-C ends it with one line too, and exit status 130,
    whatever it interrupted (a lazy import of an extension module included)."""
    try:
        yield
    except BaseException as e:
        if interrupted(e):
            say_interrupted()
            sys.exit(130)
        if isinstance(e, DataError):
            sys.exit(f'error: {e}')
        if isinstance(e, MemoryError):  # CuPy's OutOfMemoryError is one too; the estimates before are lower bounds
            sys.exit(f'error: out of memory ({str(e).strip()[:200] or "the machine has no more"}): lower the batch '
                     'size (--batchsize) or the model\'s size, or ask the scheduler for more memory; files already '
                     'written are whole, and a rerun resumes')
        if isinstance(e, OSError) and (e.filename or not isinstance(e, FileNotFoundError)):
            sys.exit(f'error: {e.filename or "output"}: {e.strerror or e} (errno {e.errno}). Check the path, free '
                     'some space or choose another output folder, then rerun; no incomplete file was kept under a '
                     'final name.')
        raise


class PlainLines:
    """Standard output for Chainer's PrintReport: its terminal control (ESC[J, erase to the end of the screen,
    before each line) only where the output is a terminal; a batch job's log file gets plain lines."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, text):
        if not self.stream.isatty():
            text = text.replace('\033[J', '')
        if text:
            self.stream.write(text)

    def flush(self):
        self.stream.flush()


def best_time(function, sync, repeat):
    """Best wall time of `repeat` calls after a warm-up, each waited for (`sync`: the device's synchronisation)."""
    function()
    sync()
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def usable_cpus():
    """The CPUs this process may run on: a Slurm/PBS cpuset or taskset, not the whole node (os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Progress:
    """A one-line progress report with rate and ETA, printed at most every `interval` seconds."""

    def __init__(self, total, unit='items', label='', interval=2.0, stream=sys.stderr):
        self.total, self.unit, self.label, self.interval, self.stream = total, unit, label, interval, stream
        self.done, self.start, self.last = 0, time.time(), 0.0

    def update(self, n=1, extra=''):
        self.done += n
        now = time.time()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float('inf')
            print(f'{self.label}{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%) '
                  f'{rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}'
                  f'{" " + extra if extra else ""}', file=self.stream, flush=True)


def format_seconds(seconds):
    if not np.isfinite(seconds):
        return '?'
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def resume_trainer(trainer, out, resume):
    """Load `resume` (a snapshot, or 'auto' for the newest snapshot_iter_* in `out`, if any) into the trainer.
    Returns the snapshot's path, or None when 'auto' finds nothing (a first run)."""
    import json

    import chainer
    if not resume:
        return None
    if resume == 'auto':
        snapshots = glob.glob(os.path.join(out, 'snapshot_iter_*'))
        path = max(snapshots, key=lambda p: int(p.rsplit('_', 1)[1]), default=None)
    else:
        path = resume
    if path and not os.path.isfile(path):
        raise DataError(f'{path}: snapshot not found; --resume auto picks the newest in --out')
    if path:
        try:
            record = trainer.get_extension(RunRecord.name)
        except ValueError:
            record = None
        if record is not None:  # settings and inputs first: weights of another shape would fail to load obscurely
            try:
                with np.load(path) as f:
                    stored = f[f'extensions/{RunRecord.name}/settings'] if \
                        f'extensions/{RunRecord.name}/settings' in f.files else None
            except (OSError, ValueError) as e:
                raise DataError(f'{path}: not a readable snapshot ({e}); remove it to resume from the one before, or '
                                'start afresh') from None
            if stored is not None:
                record.check(json.loads(str(stored[()])))
        chainer.serializers.load_npz(path, trainer)
        updater = trainer.updater
        print(f'resumed from {path} at epoch {updater.epoch}, iteration {updater.iteration}', file=sys.stderr)
    return path


INPUT_PREFIX = 'input: '  # RunRecord settings that are not flags: what the run's inputs are (e.g. an extraction)


class RunRecord:
    """A trainer extension saved in every snapshot: the run's settings and the state of its random streams.

    On resume the settings are compared (a snapshot of a run with other settings is refused, naming them) and the
    random streams restored, so that a resumed run goes on exactly as the interrupted one would have. `streams`:
    {name: a numpy RandomState, or the numpy.random module itself (Chainer's dropout draws from it)}.
    """
    trigger = (1, 'epoch')
    priority = 0
    name = 'run_record'

    def __init__(self, settings, streams):
        self.settings, self.streams = settings, streams

    def __call__(self, trainer):
        pass  # it only carries state into and out of snapshots

    def check(self, stored):
        """DataError naming every setting (a flag, or an input's identity: INPUT_PREFIX keys) in which the
        snapshot's run differs from this one. A setting the snapshot does not record (older versions) is not
        compared."""
        differ = sorted(k for k in stored if stored[k] != self.settings.get(k))
        if differ:
            def name(k):
                return k[len(INPUT_PREFIX):] if k.startswith(INPUT_PREFIX) else f'--{k.replace("_", "-")}'
            raise DataError('the snapshot is of a run with other settings: '
                            + ', '.join(f'{name(k)} {stored.get(k)!r} there, {self.settings.get(k)!r} now'
                                        for k in differ)
                            + '. Resume with the same settings and inputs, or start afresh in another --out (or '
                              'without --resume)')

    def initialize(self, trainer):
        pass

    def finalize(self):
        pass

    def on_error(self, trainer, exc, tb):
        pass

    def serialize(self, serializer):
        import json

        import chainer
        if isinstance(serializer, chainer.serializer.Serializer):
            serializer('settings', np.array(json.dumps(self.settings, sort_keys=True)))
            for name, stream in self.streams.items():
                _, keys, position, has_gauss, gauss = stream.get_state()
                serializer(f'{name}_keys', np.asarray(keys))
                serializer(f'{name}_state', np.array([position, has_gauss], np.int64))
                serializer(f'{name}_gauss', np.array(gauss, np.float64))
            return
        try:
            stored = json.loads(str(serializer('settings', None)[()]))
        except KeyError:
            warn('this snapshot records no settings (written by an older version): resuming unchecked, and its '
                 'random streams start afresh')
            return
        self.check(stored)
        for name, stream in self.streams.items():
            keys = serializer(f'{name}_keys', None)
            position, has_gauss = (int(v) for v in serializer(f'{name}_state', None))
            stream.set_state(('MT19937', np.asarray(keys, np.uint32), position, has_gauss,
                              float(serializer(f'{name}_gauss', None))))


# A loss this many times that of guessing uniformly (ln of the classes) has exploded: a softmax loss of 100 ln C
# gives the true class a probability of C^-100, which no run that learns passes through.
EXPLODED = 100


def stop_on_divergence(model, out, n_classes, remedies):
    """A trainer extension that stops the run, before any snapshot or model of NaN is written, when the loss or
    a learning parameter stops being finite, or the loss explodes (EXPLODED times that of guessing among
    `n_classes`); the message says where, at which learning rate, and what to try (`remedies`: this script's
    own flags)."""
    import glob as globbing
    import math

    import chainer
    import chainer.training
    limit = EXPLODED * math.log(max(n_classes, 2))

    @chainer.training.make_extension(trigger=(1, 'iteration'), priority=chainer.training.PRIORITY_WRITER + 1)
    def check(trainer):
        loss = trainer.observation.get('main/loss')
        problem = None
        if loss is not None:
            value = float(chainer.backends.cuda.to_cpu(chainer.as_array(loss)))
            if not np.isfinite(value):
                problem = f'the loss is {value}'
            elif value > limit:
                problem = (f'the loss is {value:.3g}, over {EXPLODED} times that of guessing among {n_classes} '
                           f'classes ({math.log(max(n_classes, 2)):.2f})')
        for name, param in model.namedparams():
            if problem:
                break
            rule = param.update_rule
            if rule is not None and rule.enabled and param.array is not None and \
                    not bool(param.xp.isfinite(param.array).all()):
                problem = f'parameter {name} holds NaN or inf'
        if problem:
            optimizer = trainer.updater.get_optimizer('main')
            lr = getattr(optimizer, 'alpha', None) or optimizer.lr  # Adam: alpha is what --lr sets
            snapshots = globbing.glob(os.path.join(out, 'snapshot_iter_*'))
            kept = (f'the last snapshot, {os.path.join(out, os.path.basename(max(snapshots, key=os.path.getmtime)))}'
                    f', stays' if snapshots else 'no snapshot had been written yet')
            raise DataError(f'training diverged at iteration {trainer.updater.iteration} (epoch '
                            f'{trainer.updater.epoch + 1}): {problem}, learning rate {lr:g}. No model was written; '
                            f'{kept}. Try a learning rate ten times lower (--lr {lr / 10:g}){remedies}.')
    return check


def rate_eta_extension(total_iterations, unit_per_iteration=1, unit='samples', interval=(20, 'iteration'),
                       pauses=None):
    """A Chainer trainer extension printing iterations done, samples/s and the ETA (readable in batch logs).

    pauses(trainer) -> (seconds spent so far outside the iterations, seconds of such work still to come), e.g. the
    test evaluation after each epoch: the rate is then that of training alone and the ETA counts both."""
    import chainer.training

    start = []

    @chainer.training.make_extension(trigger=interval, priority=chainer.training.PRIORITY_READER)
    def report(trainer):
        now, done = time.time(), trainer.updater.iteration
        spent, to_come = pauses(trainer) if pauses else (0.0, 0.0)
        if not start:
            start.extend([now, done, spent])
            return
        rate = (done - start[1]) / max(now - start[0] - (spent - start[2]), 1e-9)
        eta = (total_iterations - done) / rate + to_come if rate > 0 else float('inf')
        print(f'iteration {done}/{total_iterations} ({100 * done / total_iterations:.1f}%): '
              f'{rate * unit_per_iteration:.1f} {unit}/s, ETA {format_seconds(eta)}'
              + (f' (of which {format_seconds(to_come)} evaluation)' if to_come else ''), file=sys.stderr, flush=True)

    return report
