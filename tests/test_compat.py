"""ucf/chainer_compat.py: what Chainer 7.8.1 needs on numpy 2, and pip's CUDA libraries loaded by path. These tests run
on both stacks (CI runs the suite on Python 3.11 with numpy 1.26 and on 3.12/3.13 with numpy 2)."""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from ucf import chainer_compat  # noqa: I001  (before Chainer)
import chainer
import chainer.functions as F


def test_chainer_functions_that_read_removed_numpy_names_work():
    # as_strided reads np.sctypes at import and in its backward; resize_images asks for np.float
    x = chainer.Variable(np.arange(12, dtype=np.float32))
    y = F.as_strided(x, (3, 3), (1, 1))  # overlapping windows (strides in elements)
    y.grad = np.ones((3, 3), np.float32)
    y.backward()
    np.testing.assert_array_equal(y.array, [[0, 1, 2], [1, 2, 3], [2, 3, 4]])
    np.testing.assert_array_equal(x.grad[:5], [1, 2, 3, 2, 1])
    image = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    assert F.resize_images(image, (2, 3)).shape == (1, 1, 2, 3)


def test_sctypes_hold_numpy_1s_table():
    table = np.sctypes
    assert [np.dtype(t).itemsize for t in table['int']] == [1, 2, 4, 8]
    assert all(np.issubdtype(t, np.unsignedinteger) for t in table['uint'])
    assert np.float32 in table['float'] and np.float64 in table['float'] and np.complex64 in table['complex']


def test_numpy_distutils_answers_chainers_question():
    import warnings

    import numpy.distutils.system_info as info  # the real module on numpy 1.26, the stand-in on numpy 2
    with warnings.catch_warnings():  # numpy 1.26's own search warns about every BLAS it does not find
        warnings.simplefilter('ignore')
        assert isinstance(info.get_info('blas_opt'), dict)


def test_nothing_is_supplied_that_numpy_has():
    applied = chainer_compat.applied()
    if int(np.__version__.split('.')[0]) < 2:
        assert 'np.sctypes' not in applied and 'a numpy.distutils stand-in' not in ' '.join(applied)
    else:
        assert 'np.sctypes' in applied


@pytest.mark.skipif(not shutil.which('cc'), reason='needs a C compiler to build two small libraries')
def test_libraries_load_by_path_in_dependency_order(tmp_path):
    """Like pip's nvidia/*/lib folders: libA needs libB by name, nothing on LD_LIBRARY_PATH, and A sorts first.
    After loading, a dlopen by name (what CuPy and cuDNN do) finds both."""
    folder = tmp_path / 'nvidia' / 'fake' / 'lib'
    folder.mkdir(parents=True)
    (tmp_path / 'b.c').write_text('int fake_b(void) { return 41; }\n')
    (tmp_path / 'a.c').write_text('int fake_b(void);\nint fake_a(void) { return fake_b() + 1; }\n')
    subprocess.run(['cc', '-shared', '-fPIC', '-o', str(folder / 'libfakeb.so.7'), '-Wl,-soname,libfakeb.so.7',
                    str(tmp_path / 'b.c')], check=True)
    subprocess.run(['cc', '-shared', '-fPIC', '-o', str(folder / 'libfakea.so.7'), '-Wl,-soname,libfakea.so.7',
                    str(tmp_path / 'a.c'), '-L', str(folder), '-l:libfakeb.so.7'], check=True)
    with pytest.raises(OSError):
        ctypes.CDLL('libfakea.so.7')  # not on the loader's path
    loaded = chainer_compat.load_pip_cuda_libraries([str(folder)])
    assert sorted(loaded) == ['libfakea.so.7', 'libfakeb.so.7']
    assert ctypes.CDLL('libfakea.so.7').fake_a() == 42


def test_library_folders_come_from_the_path(tmp_path, monkeypatch):
    (tmp_path / 'nvidia' / 'cudnn' / 'lib').mkdir(parents=True)
    (tmp_path / 'nvidia' / 'cudnn' / 'include').mkdir()
    monkeypatch.setattr('sys.path', [str(tmp_path)])
    assert chainer_compat.pip_cuda_library_folders() == [os.path.join(str(tmp_path), 'nvidia', 'cudnn', 'lib')]
    monkeypatch.setenv('UCF_NO_PIP_CUDA', '1')
    assert chainer_compat.load_pip_cuda_libraries() == {}
