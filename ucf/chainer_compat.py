"""What Chainer 7.8.1 (frozen upstream in 2020) needs to import and run on today's stack: Python 3.12/3.13 with
numpy 2, and CuPy 13/14 with CUDA from pip. Every script imports this module before Chainer; on the pinned stack
(Python 3.11, numpy 1.26) it supplies only `numpy.float` (and loads pip's CUDA libraries in a GPU venv).

Each fix below names the line of Chainer it is for, and each only supplies what is missing:
- numpy 2 removed `np.sctypes`, read at import by chainer/functions/array/as_strided.py (and by its backward).
  The table is rebuilt with numpy 1's contents.
- numpy.distutils is gone (numpy 2.5, and every numpy on Python >= 3.12), imported at the top of
  chainer/_environment_check.py only to ask, on macOS alone, whether numpy uses Accelerate. Where it does not
  import, a module that answers "no BLAS information" stands in for it, which skips that macOS warning.
- `numpy.float` (removed in numpy 1.24) is what F.resize_images asks linspace for; it was Python's float.
- setuptools' pkg_resources, which Chainer imports, warns that it is deprecated on every run (setuptools >= 80);
  the warning says nothing a user can act on, so it is silenced for that import.
- CuPy 13.6 (cupy-cuda12x) finds CUDA and cuDNN only through the system loader, so pip's nvidia-*-cu12
  libraries would need LD_LIBRARY_PATH set before Python starts. `load_pip_cuda_libraries` loads them by path
  instead (a library already loaded is what the loader hands out for its name), before CuPy is imported.
"""
import ctypes
import glob
import importlib
import importlib.util
import os
import sys
import types
import warnings

import numpy

def _sctypes():
    sized = [numpy.dtype(f'{kind}{size}').type for kind in 'iu' for size in (1, 2, 4, 8)]
    return {'int': sized[:4], 'uint': sized[4:],
            'float': [numpy.float16, numpy.float32, numpy.float64, numpy.longdouble],
            'complex': [numpy.complex64, numpy.complex128, numpy.clongdouble],
            'others': [bool, object, bytes, str, numpy.void]}


_APPLIED = []


def applied():
    """What this module supplied in this process, in words (empty on the pinned stack without pip's CUDA)."""
    loaded = [f'{len(PIP_CUDA_LIBRARIES)} CUDA libraries from pip'] if PIP_CUDA_LIBRARIES else []
    return _APPLIED + loaded


def _supply_numpy():
    if not _has(numpy, 'sctypes'):
        numpy.sctypes = _sctypes()
        _APPLIED.append('np.sctypes')
    if not _has(numpy, 'float'):
        numpy.float = float
        _APPLIED.append('np.float')
    try:
        importlib.import_module('numpy.distutils.system_info')  # present on numpy 1.26 with Python 3.11
    except ImportError:
        stand_in = types.ModuleType('numpy.distutils.system_info')
        stand_in.get_info = lambda name, notfound_action=0: {}
        package = types.ModuleType('numpy.distutils')
        package.system_info = stand_in
        package.__path__ = []
        sys.modules.setdefault('numpy.distutils', package)
        sys.modules.setdefault('numpy.distutils.system_info', stand_in)
        _APPLIED.append('a numpy.distutils stand-in')


def _has(module, name):
    """hasattr without numpy's own warning for names it deprecated (numpy 1.2x warns on np.float and friends)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            return getattr(module, name) is not None
        except AttributeError:
            return False


def pip_cuda_library_folders():
    """The lib folders of pip's NVIDIA packages (nvidia-cuda-runtime-cu12, nvidia-cudnn-cu12, ...) on sys.path."""
    folders = []
    for entry in sys.path:
        folders += sorted(glob.glob(os.path.join(entry or '.', 'nvidia', '*', 'lib')))
    return [f for f in folders if os.path.isdir(f)]


def load_pip_cuda_libraries(folders=None):
    """Loads every shared library in `folders` (default: pip's NVIDIA packages) with global symbols, so that
    CuPy's and cuDNN's own dlopen of a library name finds it loaded. Libraries that need another one of the set
    are retried until no more load. Returns {file name: path} of those loaded; does nothing when
    UCF_NO_PIP_CUDA=1 (a site's own CUDA modules are then used as they are) or CuPy is not installed."""
    if os.environ.get('UCF_NO_PIP_CUDA') == '1' or (folders is None and importlib.util.find_spec('cupy') is None):
        return {}
    pending = []
    for folder in pip_cuda_library_folders() if folders is None else folders:
        pending += sorted(glob.glob(os.path.join(folder, 'lib*.so*')))
    loaded = {}
    while pending:
        failed = []
        for path in pending:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded[os.path.basename(path)] = path
            except OSError:
                failed.append(path)
        if len(failed) == len(pending):
            break
        pending = failed
    return loaded


def _quiet_pkg_resources():
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
        try:
            import pkg_resources  # noqa: F401  (cached for Chainer's own import of it)
        except ImportError:
            pass


_supply_numpy()
_quiet_pkg_resources()
PIP_CUDA_LIBRARIES = load_pip_cuda_libraries()
