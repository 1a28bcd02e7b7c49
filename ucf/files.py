"""Files: atomic writes, locks, disk space, writable outputs, no output over an input, writes isolated from HDF5
crashes."""
import contextlib
import errno
import io
import os
import re
import tempfile
import time

import numpy as np

from ucf.errors import DataError, warn


def bytes_digest(data):
    """A content digest for files the pipeline writes and checks later (blake2b, 128 bits; ~1 GB/s)."""
    import hashlib
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path):
    import hashlib
    digest = hashlib.blake2b(digest_size=16)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def host_name():
    """This machine's name, safe in a file name."""
    import socket
    return re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:40] or 'host'


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def exclusive_lock(path, what):
    """Hold an exclusive lock on `path` (created if needed) for the duration, or stop with a DataError naming the
    job that holds it (host, pid and start, written into the file by the holder). `what` says what is locked.
    On a file system that refuses locks (some Lustre mounts), warns and goes on unlocked."""
    import fcntl
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            raise DataError(f'{what} is being done right now by {holder} (it holds {path}): two jobs on it at once '
                            'would overwrite each other\'s files. Wait for it to finish (then rerun this one: it '
                            'skips what is done), or stop it first') from None
        except OSError as e:
            warn(f'cannot lock {path} ({e.strerror}): make sure that only one job does {what} at a time')
        f.seek(0)
        f.truncate()
        f.write(f'pid {os.getpid()} on {host_name()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        f.flush()
        yield


@contextlib.contextmanager
def atomic_path(path, remove_stale=False):
    """Yield a temporary name in the same folder; on success it is renamed to `path` in one step.

    A job killed mid-write leaves only a hidden '.tmp' file that no later step reads as complete. With
    remove_stale (for outputs that have one writer at a time), such leftovers of `path` are deleted first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    if remove_stale:
        for name in os.listdir(folder):
            if name.startswith(f'.{base}.') and name.endswith(f'.tmp{ext}'):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=f'.tmp{ext}', dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like any other file
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # name the file the user asked for
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


def ensure_space(path, needed_bytes):
    """Refuse to start writing `path` when the disk (or the shell's file-size limit, ulimit -f) cannot take it:
    better one clear line now than a full disk an hour into the job."""
    import resource
    import shutil
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    needed = int(needed_bytes * 1.05) + (1 << 20)
    if needed > free:
        raise DataError(f'{path}: needs about {human_bytes(needed)} but {probe} has {human_bytes(free)} free; '
                        'free some space or write elsewhere')
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise DataError(f'{path}: needs about {human_bytes(needed)} but files are limited to {human_bytes(limit)} '
                        '(ulimit -f); raise the limit or write elsewhere')


def human_bytes(n):
    """1234567 -> '1.2 MB' (decimal units, three significant digits at most)."""
    for unit in ('bytes', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB'):
        if abs(n) < 999.5 or unit == 'EB':
            return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.3g} {unit}'
        n /= 1000
    return f'{n:.3g} EB'


def run_isolated(function, *args):
    """Run function(*args) in a forked child and return its result.

    HDF5 crashes the whole interpreter (segmentation fault) when a write fails half-way, e.g. on a disk that
    fills up; in a child, that becomes an error the parent can report, and the parent's atomic_path removes
    the temporary file.
    """
    import multiprocessing
    context = multiprocessing.get_context('fork')
    receive, send = context.Pipe(duplex=False)

    def child():
        import faulthandler
        faulthandler.disable()  # a crash here is expected and reported by the parent; no C-level dump
        try:
            send.send(('ok', function(*args)))
        except BaseException as e:  # handed to the parent, which raises it
            send.send(('error', e))

    process = context.Process(target=child)
    process.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = 'crash', None
    process.join()
    if status == 'ok':
        return value
    if status == 'error' and isinstance(value, (DataError, OSError, KeyboardInterrupt)):
        raise value
    reason = (f'{type(value).__name__}: {str(value).strip().splitlines()[0][:100]}' if status == 'error'
              else f'exit {process.exitcode}')
    raise OSError(errno.EIO, f'the writer failed ({reason}); the disk may be full')


def save_npy_atomic(path, array):
    """np.save, atomically; returns the digest of the bytes written (bytes_digest). The bytes go through Python's
    own write: numpy's tofile() ignores a short write on a full disk and would leave a truncated file that looks
    complete."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(buffer.getbuffer())
    return bytes_digest(buffer.getbuffer())


def read_npz(path, what, how):
    """{name: array} of an npz file the pipeline wrote; DataError naming the file, what it should hold and how to
    make it (`how`) when it is absent or not a readable npz."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: {what} not found. {how}')
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # text, a truncated zip, a pickle: whatever it is, it is not one
        raise DataError(f'{path}: not a readable npz file of {what} ({e}). {how}') from None


def check_outputs(inputs=None, files=None, folders=None):
    """A step's outputs, checked before any work starts ({flag: path} each): no output file is an input or
    another output, and every output can be written (the folders' own, and those of the files). DataError
    naming the flag otherwise."""
    files, folders = files or {}, folders or {}
    _refuse_overwriting_inputs(inputs or {}, files)
    _check_writable({**{flag: (path, True) for flag, path in folders.items()},
                     **{flag: (path, False) for flag, path in files.items()}})


def _check_writable(outputs):
    """DataError naming the flag of the first output that cannot be written (a read-only file system, a folder
    without permission, a file in the way). `outputs`: {flag: (path, is_folder)}. Writes a probe file where the
    output would go, or into the nearest existing folder above it; creates nothing that stays."""
    for flag, (path, is_folder) in outputs.items():
        folder = os.path.abspath(path if is_folder else os.path.dirname(os.path.abspath(path)))
        existing = folder
        while not os.path.isdir(existing):
            if os.path.exists(existing):
                raise DataError(f'{flag} {path}: {existing} is a file, not a folder: choose another {flag}')
            existing = os.path.dirname(existing)
        try:
            fd, probe = tempfile.mkstemp(prefix='.write_probe_', dir=existing)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            example = os.path.basename(path.rstrip('/')) or 'out'
            raise DataError(f'{flag} {path}: cannot write in {existing} ({e.strerror}); choose a folder you can write '
                            f'to (scratch), e.g. {flag} $SCRATCH/{example}') from None


def _refuse_overwriting_inputs(inputs, outputs):
    """DataError naming the flags if an output path is an input (or one output is another): no step may write over
    what it reads. `inputs`, `outputs`: {flag: path}."""
    def same(a, b):
        try:
            return os.path.samefile(a, b)
        except OSError:  # one of them does not exist (yet): compare where they would be
            return os.path.realpath(a) == os.path.realpath(b)
    named = list(outputs.items())
    for i, (out_flag, out_path) in enumerate(named):
        for in_flag, in_path in list(inputs.items()) + named[:i]:
            if same(out_path, in_path):
                raise DataError(f'{out_flag} {out_path} is also {in_flag}: writing it would destroy '
                                f'{"an input" if (in_flag, in_path) in inputs.items() else "another output"} of '
                                f'this step. Give {out_flag} another path')
