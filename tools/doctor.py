"""Preflight: is this machine ready for the pipeline? One verdict table; every line that fails says what to do.

    make doctor                                  # or: python tools/doctor.py
    python tools/doctor.py --device 1            # check another GPU
    python tools/doctor.py --require-gpu         # fail unless a usable GPU is found

Run it on the node the jobs will use (an interactive allocation, or as the first step of a job:
`generate_pbs.py --doctor` puts `doctor.py --require-gpu --quick` at the top of every GPU job script), so that a
broken GPU stack shows in a minute rather than after a 2.5-hour job. Without a GPU it checks the CPU side, says so
and exits 0 (1 with --require-gpu). Where a GPU is found it runs VGG16 at 224x224 on it (random weights, real
shapes): forward and backward compared with the CPU, extraction frames/s, a fine-tuning step, and the memory used.

What it knows about the GPU stack (README, GPU): Chainer 7.8.1 officially supports CuPy 7 only, which has no
CUDA 12 build; later CuPy is "experimental" upstream and makes Chainer warn (CHAINER_WARN_VERSION_MISMATCH=0
silences it). Two installs work from the venv: `make venv GPU=cuda12` (CuPy 13.6 with cuDNN 8.9 and every CUDA
12 library from pip, loaded by chainer_compat; either stack) and `make venv GPU=cuda13` (CuPy 14 with CUDA 13
from pip; numpy 2, so Python 3.12/3.13). CuPy 14 has no cuDNN: Chainer convolves by im2col (conv1_2's buffer
alone is ~4 GB at batch 36, and it is slower); with CuPy 13 a missing cuDNN is a failure, since Chainer falls
back to the same without a word. cuDNN 9 (what `pip install nvidia-cudnn-cu12` brings today) is not usable by
CuPy 13.
"""
import argparse
import collections
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: its steps and ucf/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ucf import chainer_compat  # noqa: F401  (before Chainer: what it needs on numpy 2 and pip's CUDA)
import numpy as np

STACKS = {(3, 11): 'pinned', (3, 12): 'current', (3, 13): 'current'}
STACK_FILES = {'pinned': 'requirements/pinned.txt', 'current': 'requirements/current.txt'}
Check = collections.namedtuple('Check', 'name verdict detail fix')  # verdict: ok, warn, FAIL, skip

CUPY_WHEEL = 'make venv GPU=cuda12 (CUDA 12) or GPU=cuda13 (CUDA 13, Python 3.12/3.13)'
INSTALL_CUPY = ('`make venv GPU=cuda12` (a CUDA 12 driver, R525+: CuPy 13.6, cuDNN 8) or `make venv GPU=cuda13` '
                '(a CUDA 13 driver, R580+, Python 3.12/3.13: CuPy 14, no cuDNN)')
INSTALL_CUDNN = ('`make venv GPU=cuda12` (cuDNN 8.9 from pip, loaded by chainer_compat), or `module load cudnn` '
                 'with a cuDNN 8 (cuDNN 9, today\'s `pip install nvidia-cudnn-cu12`, does not work with CuPy 13)')
NO_CUDNN_COST = 'Chainer convolves by im2col: conv1_2 alone needs ~4 GB more at batch 36, and it is slower'
FEATURE_DISK_GB = 35  # UCF-101's features and predictions (~11 GB) plus the packed and normalised HDF5 files


def version_of(package):
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def software_checks():
    """Python, numpy, setuptools and Chainer: one of the two stacks Chainer 7.8.1 runs on here (README, Install)."""
    from ucf import chainer_compat
    checks = []
    python, minor = platform.python_version(), sys.version_info[:2]
    stack = STACKS.get(minor)
    checks.append(Check('Python', 'ok' if stack else 'FAIL',
                        f'{python}: the {stack} stack ({STACK_FILES[stack]})' if stack else python,
                        'the project runs on Python 3.11 (pinned stack) or 3.12/3.13 (current stack): '
                        '`make venv PYTHON=/path/to/python3.12`'))
    numpy_version = np.__version__
    major_minor = tuple(int(v) for v in numpy_version.split('.')[:2])
    good = (1, 26) <= major_minor < (2, 6)
    checks.append(Check('numpy', 'ok' if good else 'warn', numpy_version + (
                        ' (numpy 2: Chainer runs through chainer_compat)' if major_minor >= (2, 0) else ''),
                        'tested with numpy 1.26 (Python 3.11) and 2.5 (3.12/3.13; CuPy 13.6 needs <2.6): `make venv`'))
    setuptools = version_of('setuptools') or 'not installed'
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import pkg_resources  # noqa: F401
        checks.append(Check('setuptools', 'ok', f'{setuptools} (pkg_resources, which Chainer imports)', ''))
    except Exception as e:
        checks.append(Check('setuptools', 'FAIL', f'{setuptools}: pkg_resources does not import ({type(e).__name__})',
                            'Chainer imports pkg_resources: setuptools 65 (Python 3.11) or 80 (3.12/3.13; 82 '
                            'removed it): `make venv`'))
    applied = chainer_compat.applied()
    checks.append(Check('Chainer compatibility', 'ok', 'supplied ' + ', '.join(applied) if applied else
                        'nothing needed on this stack', ''))
    try:
        import chainer
        checks.append(Check('Chainer', 'ok' if chainer.__version__ == '7.8.1' else 'warn', chainer.__version__,
                            'the project is tested with Chainer 7.8.1: `make venv`'))
    except Exception as e:  # an import that breaks is exactly what this tool must report
        checks.append(Check('Chainer', 'FAIL', f'does not import ({type(e).__name__}: {e})', 'rebuild: `make venv`'))
    return checks


def host_checks():
    """CPUs this job may use, the CPU convolution's BLAS, free disk and HDF5 file locking where we run."""
    from ucf.runcontrol import usable_cpus
    checks = [Check('CPUs for this job', 'ok', f'{usable_cpus()} of {os.cpu_count()} on the node (its cpuset)', '')]
    try:
        from ucf import fast_conv
        blas = fast_conv.blas_in_use()
        checks.append(Check('CPU convolution', 'ok' if blas else 'warn',
                            f"fast_conv on numpy's {blas}" if blas else "numpy has no OpenBLAS: fast_conv's slower "
                                                                     'path (CPU only; a GPU is unaffected)',
                            'install numpy from PyPI wheels (they bundle OpenBLAS): `make venv`'))
    except Exception as e:
        checks.append(Check('CPU convolution', 'warn', f'fast_conv unusable ({type(e).__name__}: {e})',
                            'use --conv stock, or rebuild with `make venv`'))
    free = shutil.disk_usage('.').free / 1e9
    checks.append(Check('free disk here', 'ok' if free >= FEATURE_DISK_GB else 'warn',
                        f'{free:,.0f} GB in {os.getcwd()}',
                        f'Part 2 writes ~{FEATURE_DISK_GB} GB at full UCF-101 scale: run from a folder on a larger '
                        'file system (scratch)'))
    checks.append(hdf5_locking_check())
    return checks


def hdf5_locking_check():
    import h5py
    try:
        folder = tempfile.mkdtemp(prefix='.doctor_', dir='.')
    except OSError as e:
        return Check('HDF5 files here', 'FAIL', f'cannot write in {os.getcwd()} ({e.strerror})',
                     'run the pipeline from a folder you can write to (scratch)')
    try:
        with h5py.File(os.path.join(folder, 'probe.hdf5'), 'w') as f:
            f['x'] = np.zeros(3)
        with h5py.File(os.path.join(folder, 'probe.hdf5'), 'r') as f:
            f['x'][...]
        return Check('HDF5 files here', 'ok', f'h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}', '')
    except OSError as e:
        locking = 'lock' in str(e).lower()
        return Check('HDF5 files here', 'FAIL', f'cannot write and read an HDF5 file: {e}',
                     'this file system refuses HDF5 file locks: `export HDF5_USE_FILE_LOCKING=FALSE` (in the job '
                     'script too)' if locking else 'check that this folder is writable')
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def video_checks():
    """The decoder the pipeline reads clips with (PyAV), and a real test: an XVID AVI with packed B-frames (the
    kind UCF-101 holds), made by imageio-ffmpeg's ffmpeg, read back in and out of order."""
    try:
        import av
    except Exception as e:  # not installed, or a broken build: both are what this tool must say
        return [Check('video decoder', 'FAIL', f'PyAV does not import ({type(e).__name__}: {e})',
                      'the pipeline decodes clips with PyAV: `make venv` (requirements.txt pins av)')]
    try:
        import imageio_ffmpeg
    except Exception as e:
        return [Check('video decoder', 'ok', f'PyAV {av.__version__}', ''),
                Check('ffmpeg (encoding)', 'FAIL', f'imageio-ffmpeg does not import ({type(e).__name__}: {e})',
                      'the synthetic set and this check encode with its ffmpeg: `make venv`')]
    from ucf import video
    checks = [Check('video decoder', 'ok', f'PyAV {av.__version__}, libavcodec '
                                         f'{".".join(map(str, av.library_versions["libavcodec"]))}', '')]
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    version = subprocess.run([exe, '-version'], capture_output=True, text=True).stdout.split('\n')[0]
    checks.append(Check('ffmpeg (encoding)', 'ok', f'{" ".join(version.split()[:3])} ({exe})', ''))
    folder = tempfile.mkdtemp(prefix='doctor_')
    path = os.path.join(folder, 'v_Doctor_g01_c01.avi')
    try:
        made = subprocess.run([exe, '-v', 'error', '-f', 'lavfi', '-i', 'testsrc2=size=96x72:rate=25:duration=1.2',
                               '-c:v', 'libxvid', '-bf', '2', '-g', '12', path], capture_output=True, text=True)
        if made.returncode:
            return checks + [Check('XVID with B-frames', 'FAIL', f'could not encode one: {made.stderr.strip()[:120]}',
                                   'reinstall imageio-ffmpeg: `make venv`')]
        frames, info = video.read_frames(path), video.video_info(path)
        order = np.random.RandomState(0).permutation(len(frames))
        wrong = sum(not np.array_equal(video.read_frame(path, int(i), info).rgb, frames[i]) for i in order)
        good = wrong == 0 and len(frames) == info.frames
        checks.append(Check('XVID with B-frames', 'ok' if good else 'FAIL',
                            f'{len(frames)} frames decoded, random access exact' if good else
                            f'{wrong} of {len(frames)} frames differ between random and sequential reads',
                            'reinstall PyAV (`make venv`) and report this: frames would be wrong'))
    except Exception as e:
        checks.append(Check('XVID with B-frames', 'FAIL', f'{type(e).__name__}: {e}', 'reinstall: `make venv`'))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return checks


def cupy_checks(device_id, require_gpu):
    """CuPy, CUDA runtime and driver, cuDNN, the GPU; returns (checks, usable GPU id or None)."""
    missing = 'FAIL' if require_gpu else 'skip'
    try:
        import cupy
    except ImportError:
        return [Check('CuPy', missing, 'not installed: the CPU path only', f'for a GPU: {INSTALL_CUPY}')], None
    except Exception as e:
        return [Check('CuPy', 'FAIL', f'does not import ({type(e).__name__}: {e})',
                      f'reinstall the wheel for this CUDA: {INSTALL_CUPY}')], None
    major = int(cupy.__version__.split('.')[0])
    numpy_2 = int(np.__version__.split('.')[0]) >= 2
    if major == 7:
        verdict, detail = 'ok', 'supported by Chainer 7.8.1'
    elif 8 <= major <= 13:
        verdict, detail = 'warn', ('"experimental" for Chainer 7.8.1 (officially CuPy 7 only), tested here; '
                                   'silence its warning with CHAINER_WARN_VERSION_MISMATCH=0')
    elif major == 14 and numpy_2:
        verdict, detail = 'warn', f'"experimental" for Chainer 7.8.1 and without cuDNN: {NO_CUDNN_COST}'
    elif major == 14:
        verdict, detail = 'FAIL', 'needs numpy 2 (this is the pinned stack, numpy 1.26)'
    else:
        verdict, detail = 'warn', 'newer than any CuPy this project was tried with'
    checks = [Check('CuPy', verdict, f'{cupy.__version__}: {detail}',
                    INSTALL_CUPY if verdict == 'FAIL' else '`make venv GPU=cuda12` keeps cuDNN' if major == 14 else
                    'CHAINER_WARN_VERSION_MISMATCH=0')]
    if verdict == 'FAIL':
        return checks, None
    from ucf import chainer_compat
    pip_libraries = sorted(chainer_compat.PIP_CUDA_LIBRARIES)
    shown = ', '.join(pip_libraries[:4]) + (', ...' if len(pip_libraries) > 4 else '')
    checks.append(Check('CUDA libraries', 'ok', f'{len(pip_libraries)} from pip in this venv, loaded by '
                                                f'chainer_compat ({shown})'
                        if pip_libraries else 'none from pip: the system loader\'s (LD_LIBRARY_PATH, modules)', ''))
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
        driver, toolkit = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception as e:
        return checks + [Check('CUDA', missing, f'no usable driver or GPU ({type(e).__name__}: {e})',
                               'run on a GPU node (and `module load cuda` where the site needs it)')], None

    def cuda_version(v):
        return f'{v // 1000}.{v % 1000 // 10}'
    checks.append(Check('CUDA', 'ok' if driver >= toolkit else 'FAIL',
                        f'runtime {cuda_version(toolkit)}, driver supports up to {cuda_version(driver)}',
                        f'the driver is older than the CUDA runtime of this CuPy: install the CuPy wheel of an older '
                        f'CUDA ({CUPY_WHEEL}) or load a matching module'))
    if not 0 <= device_id < count:
        return checks + [Check('GPU', missing, f'{count} GPUs visible, none with id {device_id}',
                               'ask the scheduler for a GPU (--gres=gpu:1, or a GPU node) or pick --device')], None
    with cupy.cuda.Device(device_id):
        props = runtime.getDeviceProperties(device_id)
        free, total = runtime.memGetInfo()
    name = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
    checks.append(Check('GPU', 'ok' if free > 4e9 else 'warn',
                        f'{device_id}: {name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free',
                        'another process holds most of its memory: pick a free GPU (--device) or wait'))
    try:
        import chainer
    except Exception as e:  # reported by the Chainer line above; the GPU cannot be used without it
        return checks + [Check('cuDNN', 'skip', f'Chainer does not import ({type(e).__name__})',
                               'see the Chainer line')], None
    cuda = chainer.backends.cuda
    if cuda.cudnn_enabled:
        checks.append(Check('cuDNN', 'ok', f'{cuda._cudnn_version}, enabled in Chainer', ''))
    elif os.environ.get('CHAINER_CUDNN') == '0':
        checks.append(Check('cuDNN', 'warn', 'switched off by CHAINER_CUDNN=0', 'unset CHAINER_CUDNN'))
    elif major >= 14:
        checks.append(Check('cuDNN', 'warn', f'none in CuPy {major}: {NO_CUDNN_COST}',
                            '`make venv GPU=cuda12` (CuPy 13.6 with cuDNN 8) where the speed matters'))
    else:
        checks.append(Check('cuDNN', 'FAIL', f'not found: {NO_CUDNN_COST}', INSTALL_CUDNN))
    return checks, device_id


def gpu_step_checks(device, batch, repeat, sync, memory_used, insize=224, widths=None):
    """VGG16 at insize x insize on `device` (random weights, real shapes at 224): forward and backward against
    the CPU, extraction and fine-tuning speed, memory (sync: wait for the device; memory_used: bytes held)."""
    import copy

    import chainer
    import VGGNet
    import VGGNet_1024
    from ucf.runcontrol import best_time
    shape = dict(insize=insize, widths=widths or VGGNet.WIDTHS)
    np.random.seed(0)
    cpu_model = VGGNet_1024.VGGNet_1024(101, train_from='conv1_1', dropout=0.0, **shape)
    x = np.random.RandomState(0).normal(0, 50, (2, 3, insize, insize)).astype(np.float32)
    t = np.array([3, 7], np.int32)

    def step(model, xs, ts):
        model.cleargrads()
        loss = model(xs, ts)
        loss.backward()
        return [chainer.backends.cuda.to_cpu(a) for a in (loss.array, model.fc8.W.grad, model.conv1_1.W.grad)]

    checks = []
    start = time.perf_counter()
    reference = step(cpu_model, x, t)
    model = copy.deepcopy(cpu_model)
    model.to_device(device)
    device.use()
    result = step(model, device.send(x), device.send(t))
    error = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(result, reference))
    checks.append(Check('GPU vs CPU, VGG16 step', 'ok' if error < 1e-3 else 'FAIL',
                        f'largest relative difference {error:.1e} (loss, fc8 and conv1_1 gradients; '
                        f'{time.perf_counter() - start:.0f} s)',
                        'the GPU computes something else than the CPU: check the CuPy/CUDA versions above'))

    def timed(function):
        return best_time(function, sync, repeat)

    np.random.seed(0)
    model = VGGNet_1024.VGGNet_1024(101, **shape)
    model.to_device(device)
    frames = device.send(np.random.RandomState(1).normal(0, 50, (32, 3, insize, insize)).astype(np.float32))
    seconds = timed(lambda: model.predict(frames))
    checks.append(Check('GPU extraction speed', 'ok', f'{32 / seconds:,.0f} frames/s (VGGNet_1024.predict, batch 32, '
                                                      f'{insize}x{insize})', ''))
    optimizer = chainer.optimizers.MomentumSGD(lr=0.0005, momentum=0.9)
    optimizer.setup(model)
    model.freeze_below_train_from()
    xs = device.send(np.random.RandomState(2).normal(0, 50, (batch, 3, insize, insize)).astype(np.float32))
    ts = device.send((np.arange(batch) % 101).astype(np.int32))
    seconds = timed(lambda: optimizer.update(model, xs, ts))
    checks.append(Check('GPU fine-tuning speed', 'ok', f'{seconds * 1000:,.0f} ms a step at batch {batch} '
                                                       f'(fc7+fc8 learn), {batch / seconds:,.0f} frames/s', ''))
    checks.append(Check('GPU memory used', 'ok', f'{memory_used() / 2**30:.2f} GiB held after these steps', ''))
    return checks


def cupy_step_checks(device_id, batch, repeat):
    import cupy
    from ucf.flags import device_from_arg
    pool = cupy.get_default_memory_pool()
    return gpu_step_checks(device_from_arg(str(device_id)), batch, repeat,
                           cupy.cuda.Device(device_id).synchronize, pool.total_bytes)


def run_checks(args):
    checks = software_checks() + host_checks() + video_checks()
    gpu_checks, device_id = cupy_checks(args.device, args.require_gpu)
    checks += gpu_checks
    if device_id is None:
        checks.append(Check('GPU run', 'FAIL' if args.require_gpu else 'skip',
                            'no usable GPU: the CPU checks above are what this machine can run',
                            'see the lines above; --require-gpu makes this a failure'))
    elif all(c.verdict != 'FAIL' for c in checks):
        try:
            checks += cupy_step_checks(device_id, args.batchsize, 2 if args.quick else 5)
        except Exception as e:
            checks.append(Check('GPU run', 'FAIL', f'VGG16 on the GPU failed: {type(e).__name__}: {e}'[:300],
                                'check the CuPy/CUDA/cuDNN lines above; out of memory: a smaller --batchsize'))
    return checks


def print_table(checks, stream=None):
    stream = stream or sys.stdout
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f'{c.name:<{width}}  {c.verdict:<4}  {c.detail}', file=stream)
    failing = [c for c in checks if c.verdict in ('FAIL', 'warn') and c.fix]
    if failing:
        print('\nwhat to do:', file=stream)
        for c in failing:
            print(f'  {c.name} ({c.verdict}): {c.fix}', file=stream)
    failed = sum(c.verdict == 'FAIL' for c in checks)
    print(f'\ndoctor: {"NOT READY, " + str(failed) + " check(s) failed" if failed else "ready"} '
          f'({sum(c.verdict == "ok" for c in checks)} ok, {sum(c.verdict == "warn" for c in checks)} warnings, '
          f'{sum(c.verdict == "skip" for c in checks)} skipped)', file=stream, flush=True)
    return failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', '-d', type=int, default=0, help='GPU to check')
    p.add_argument('--require-gpu', action='store_true', help='fail unless a usable GPU is found')
    p.add_argument('--batchsize', '-b', type=int, default=36, help='fine-tuning batch for the GPU step (the handout)')
    p.add_argument('--quick', action='store_true', help='fewer timing repetitions (as the first step of a job)')
    args = p.parse_args(argv)
    if args.batchsize < 1:
        p.error('--batchsize must be at least 1')
    failed = print_table(run_checks(args))
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    main()
