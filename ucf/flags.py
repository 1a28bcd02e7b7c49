"""Command lines: the knobs several scripts share, each defined once, and argparse types that refuse nonsense at
parse time (exit 2 naming the flag), not hours into a job."""
import argparse
import sys

import numpy as np

from ucf.errors import DataError


def _number(kind, test, requirement):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            try:  # 1e6 is a whole number too; 2.5 is not one
                number = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
            if kind is not int or not number.is_integer():
                raise argparse.ArgumentTypeError(f'{text} is not {requirement}') from None
            value = int(number)
        if not test(value):
            raise argparse.ArgumentTypeError(f'{text} is not {requirement}')
        return value
    parse.__name__ = kind.__name__
    return parse


# argparse types that refuse nonsense at parse time (exit 2 with the flag named), not hours into a job
positive_int = _number(int, lambda v: v >= 1, 'a positive whole number')
nonnegative_int = _number(int, lambda v: v >= 0, 'zero or more')
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), 'a positive number')
nonnegative_float = _number(float, lambda v: v >= 0 and np.isfinite(v), 'zero or more')
fraction = _number(float, lambda v: 0 <= v < 1, 'in [0, 1)')

DEFAULT_DEVICE = '-1'
SPLITS = (1, 2, 3)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as a configuration sheet: the docstring as written, and every flag with its default."""


def add_data_flags(group, data=True):
    """--data (the clips; not for steps that read only features), --lists and --split, UCF-101's names."""
    if data:
        group.add_argument('--data', default='UCF-101', help='folder with the 101 class folders of clips')
    group.add_argument('--lists', default='ucfTrainTestlist', help='folder with classInd.txt and the split lists')
    group.add_argument('--split', type=int, default=1, choices=SPLITS, help='official split')


# The folder of each output of an extraction (VGGNet_1024.OUTPUTS), by flag: extraction writes them, packing reads them.
OUTPUT_FOLDERS = {'features': ('--features-dir', 'UCF-101_features'),
                  'predictions': ('--predictions-dir', 'UCF-101_framePrediction')}


def add_output_folder_flags(group):
    from ucf.streams import StreamPath
    for output, (flag, default) in OUTPUT_FOLDERS.items():
        group.add_argument(flag, default=StreamPath(default), help=f'folder of the per-clip {output} (.npy)')


def output_folders(args):
    """{output: folder} from the flags of add_output_folder_flags (for ucf.extraction.ExtractionStore)."""
    return {output: getattr(args, flag[2:].replace('-', '_')) for output, (flag, _) in OUTPUT_FOLDERS.items()}


def add_device_flag(group):
    group.add_argument('--device', '-d', default=DEFAULT_DEVICE,
                       help='-1 or @numpy: the CPU; 0 or @cupy:0: the first GPU')


def add_conv_flag(group):
    group.add_argument('--conv', default='fast', choices=('stock', 'fast'),
                       help="fast: ucf/fast_conv.py's CPU convolution and pooling (about 2x stock on VGG16; GPU arrays "
                            "use Chainer's own either way); stock: Chainer's own")


def add_resume_flag(group):
    group.add_argument('--resume', '-r', default=None,
                       help="snapshot to continue from, or 'auto' for the newest in --out")


def split_at_dashes(argv):
    """(the arguments before `--`, those after it): what a script takes, and what it passes on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--' not in argv:
        return argv, []
    return argv[:argv.index('--')], argv[argv.index('--') + 1:]


def use_device(model, spec):
    """Move the model to the --device and make that device current; returns the device."""
    device = device_from_arg(spec)
    model.to_device(device)
    device.use()
    return device


def device_from_arg(spec):
    """--device value -> chainer device: '-1' or '@numpy' is the CPU, '0' or '@cupy:0' the first GPU."""
    import chainer
    spec = str(spec)
    if spec.lstrip('-').isdigit():
        spec = '@numpy' if int(spec) < 0 else f'@cupy:{int(spec)}'
    try:
        return chainer.get_device(spec)
    except Exception as e:
        raise DataError(f'device {spec!r} is not usable ({e}). For a GPU install CuPy 13 (README, GPU section); '
                        'use --device -1 for the CPU.') from e
