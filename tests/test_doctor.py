"""doctor.py on a machine without a GPU: its verdict table, --require-gpu, the advice of each failing line, and
its GPU step through Chainer's @numpy device (the same code that runs on a GPU, at small shapes)."""
import re
import sys
import types

import numpy as np
import pytest

from tools import doctor
from ucf.flags import device_from_arg

LINES = ['Python', 'numpy', 'setuptools', 'Chainer compatibility', 'Chainer', 'CPUs for this job', 'CPU convolution', 'free disk here',
         'HDF5 files here', 'video decoder', 'ffmpeg (encoding)', 'XVID with B-frames', 'CuPy', 'GPU run']


def table(capsys):
    """{check name: (verdict, detail)} of the printed table, and the whole output."""
    out = capsys.readouterr().out
    rows = (re.match(r'^(\S.*?)\s{2,}(ok|warn|FAIL|skip)\s{2,}(.*)$', line) for line in out.splitlines())
    return {m.group(1): (m.group(2), m.group(3)) for m in rows if m}, out


def test_cpu_machine_passes_with_every_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, 'cupy', None)  # as on a machine without CuPy, even where it is installed
    doctor.main([])
    rows, out = table(capsys)
    assert list(rows) == LINES, out
    for name in LINES[:5] + ['HDF5 files here', 'video decoder', 'XVID with B-frames']:
        assert rows[name][0] == 'ok', (name, rows[name])
    assert 'random access exact' in rows['XVID with B-frames'][1]
    assert rows['CuPy'][0] == 'skip' and rows['GPU run'][0] == 'skip'
    assert out.strip().splitlines()[-1].startswith('doctor: ready')
    assert not list(tmp_path.iterdir())  # the HDF5 probe cleans up after itself


def test_require_gpu_fails_without_one(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'cupy', None)
    with pytest.raises(SystemExit) as e:
        doctor.main(['--require-gpu'])
    assert e.value.code == 1
    rows, out = table(capsys)
    assert rows['GPU run'][0] == 'FAIL' and rows['CuPy'][0] == 'FAIL'
    assert 'make venv GPU=cuda12' in out and 'make venv GPU=cuda13' in out and 'NOT READY' in out


def fake_cupy(version, devices=1, driver=12040, runtime=12040, fail_runtime=False):
    def device_count():
        if fail_runtime:
            raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')
        return devices
    runtime_api = types.SimpleNamespace(
        getDeviceCount=device_count, driverGetVersion=lambda: driver, runtimeGetVersion=lambda: runtime,
        getDeviceProperties=lambda i: {'name': b'NVIDIA H100 80GB HBM3'}, memGetInfo=lambda: (70 * 2**30, 80 * 2**30))

    class Device:
        def __init__(self, i):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    return types.SimpleNamespace(__version__=version, cuda=types.SimpleNamespace(runtime=runtime_api, Device=Device))


NUMPY_2 = int(np.__version__.split('.')[0]) >= 2


@pytest.mark.parametrize('cupy,expect', [
    (fake_cupy('14.2.0'), {'CuPy': ('warn', 'without cuDNN'), 'cuDNN': ('warn', 'im2col')} if NUMPY_2 else
     {'CuPy': ('FAIL', 'needs numpy 2')}),
    (fake_cupy('13.6.0', fail_runtime=True), {'CuPy': ('warn', 'CHAINER_WARN_VERSION_MISMATCH=0'),
                                              'CUDA': ('FAIL', 'no usable driver')}),
    (fake_cupy('13.6.0', driver=11080), {'CUDA': ('FAIL', 'runtime 12.4, driver supports up to 11.8')}),
    (fake_cupy('13.6.0', devices=0), {'GPU': ('FAIL', '0 GPUs visible')}),
    (fake_cupy('13.6.0'), {'GPU': ('ok', 'NVIDIA H100'), 'cuDNN': ('FAIL', 'im2col')}),
])
def test_gpu_stack_verdicts(monkeypatch, cupy, expect):
    """Each way a GPU stack goes wrong gets its own verdict and advice (a stand-in CuPy reports the versions)."""
    monkeypatch.setitem(sys.modules, 'cupy', cupy)
    monkeypatch.delenv('CHAINER_CUDNN', raising=False)
    checks, device = doctor.cupy_checks(0, require_gpu=True)
    found = {c.name: c for c in checks}
    for name, (verdict, text) in expect.items():
        assert found[name].verdict == verdict and text in found[name].detail, found[name]
        assert verdict == 'ok' or found[name].fix
    if 'cuDNN' in expect:
        assert 'GPU=cuda12' in found['cuDNN'].fix and device == 0
    if expect.get('cuDNN', ('',))[0] == 'FAIL':  # CuPy 13 without cuDNN: a module, or cuDNN 8 from pip
        assert 'module load cudnn' in found['cuDNN'].fix and 'cuDNN 9' in found['cuDNN'].fix


def test_failing_line_says_what_to_do_and_fails(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'cupy', None)
    monkeypatch.setattr(doctor, 'software_checks', lambda: [doctor.Check('numpy', 'FAIL', '2.1.0', 'pip install x')])
    with pytest.raises(SystemExit) as e:
        doctor.main([])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert '  numpy (FAIL): pip install x' in out and 'NOT READY, 1 check(s) failed' in out


def test_broken_environment_gets_lines_not_a_traceback(capsys, monkeypatch, tmp_path):
    """Seen on a GPU node whose Python had numpy 2 and no video packages: Chainer does not import, PyAV and
    imageio-ffmpeg are missing, CuPy is there. Every one is a line of the table with what to do."""
    import av
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, 'cupy', fake_cupy('13.6.0'))
    monkeypatch.setitem(sys.modules, 'chainer', None)  # `import chainer` raises ImportError
    monkeypatch.setitem(sys.modules, 'av', None)
    monkeypatch.setattr(doctor, 'host_checks', lambda: [])
    with pytest.raises(SystemExit) as e:
        doctor.main([])
    assert e.value.code == 1
    rows, out = table(capsys)
    assert rows['Chainer'][0] == 'FAIL' and rows['video decoder'][0] == 'FAIL' and 'PyAV does not import' in out
    assert rows['CuPy'][0] == 'warn' and rows['GPU'][0] == 'ok' and rows['GPU run'][0] == 'skip'
    monkeypatch.setitem(sys.modules, 'av', av)
    monkeypatch.setitem(sys.modules, 'imageio_ffmpeg', None)
    assert [c.verdict for c in doctor.video_checks()] == ['ok', 'FAIL']


def test_hdf5_lock_refusal_names_the_variable(monkeypatch, tmp_path):
    import h5py
    monkeypatch.chdir(tmp_path)

    def refuse(*a, **k):
        raise OSError('Unable to create file (unable to lock file, errno = 38, error message = '
                      "'Function not implemented')")
    monkeypatch.setattr(h5py, 'File', refuse)
    check = doctor.hdf5_locking_check()
    assert check.verdict == 'FAIL' and 'HDF5_USE_FILE_LOCKING=FALSE' in check.fix


def test_gpu_step_runs_device_generic_code():
    """The GPU step, run through Chainer's @numpy device: a model moved with to_device, arrays sent with
    device.send, results back with to_cpu; on a GPU the same lines run with CuPy."""
    checks = doctor.gpu_step_checks(device_from_arg('@numpy'), 4, 1, lambda: None, lambda: 0, insize=32,
                                    widths=(4, 4, 8, 8, 8))
    assert [c.name for c in checks] == ['GPU vs CPU, VGG16 step', 'GPU extraction speed', 'GPU fine-tuning speed',
                                        'GPU memory used']
    assert all(c.verdict == 'ok' for c in checks) and 'relative difference 0.0e+00' in checks[0].detail


def test_unwritable_folder_is_a_failing_line(monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(doctor.tempfile, 'mkdtemp', refuse)
    check = doctor.hdf5_locking_check()
    assert check.verdict == 'FAIL' and 'cannot write in' in check.detail and 'scratch' in check.fix
