"""The streams: what a network sees of a video, and the default names of what each stream's steps read and write.

    rgb          single RGB frames (the handout's)
    flow         stacks of optical flow fields between consecutive frames (ucf/flow.py)
    two-stream   both, fused: single-frame scores from both streams' per-frame predictions, and the LSTM on both
                 streams' features of each frame side by side (scoring and the LSTM only)

Every step takes --stream; a flag whose default is a stream's file (`StreamPath`) gets the stream's suffix when it
is not given: `--stream flow` reads VGG_1024_flow.model, writes UCF-101_features_flow/, train1024_flow.hdf5, ...
With two-stream, what a step writes gets '_twostream' and what it reads comes from both streams (its rgb flags
and its flow flags). A path given on the command line is taken as it is.
"""
import collections
import functools
import os

from ucf.flow import clip_stacks, stacked
from ucf.preprocessing import preprocess_frame
from ucf.video import iter_frames

Stream = collections.namedtuple('Stream', 'suffix help')
STREAMS = {
    'rgb': Stream('', "single RGB frames (the handout's)"),
    'flow': Stream('_flow', 'stacks of optical flow fields (ucf/flow.py)'),
    'two-stream': Stream('_twostream', 'rgb and flow fused: per-frame predictions averaged, features side by side'),
}
NETWORK_STREAMS = ('rgb', 'flow')  # the streams a network is fine-tuned and extracted for


class StreamPath(str):
    """A flag's default path, named for the rgb stream; other streams add their suffix (stream_path). `role`:
    'output' follows --stream; 'input' follows it too, but reads the rgb stream's file for two-stream; 'flow' is
    always the flow stream's (the second input of two-stream)."""

    def __new__(cls, path, role='output'):
        value = super().__new__(cls, path)
        value.role = role
        return value


def stream_path(path, stream):
    """'train1024.hdf5' -> 'train1024_flow.hdf5', 'UCF-101_features' -> 'UCF-101_features_flow' (a folder's
    trailing slash kept)."""
    head, slash = path.rstrip('/'), '/' if path.endswith('/') else ''
    root, ext = os.path.splitext(head)
    return root + STREAMS[stream].suffix + ext + slash


def add_stream_flag(group, choices=tuple(STREAMS)):
    group.add_argument('--stream', default='rgb', choices=list(choices),
                       help='; '.join(f'{name}: {STREAMS[name].help}' for name in choices)
                       + '. The default file names of another stream than rgb take its suffix ('
                       + ', '.join(f'{STREAMS[name].suffix}' for name in choices if STREAMS[name].suffix) + ')')


def add_stream_input(group, flag, default, what):
    """An input flag of a step that reads both streams for two-stream: `flag` (the stream's file; the rgb
    stream's for two-stream) and its --flow- twin (the flow stream's, read for two-stream only)."""
    group.add_argument(flag, default=StreamPath(default, 'input'), help=f'{what} (two-stream: the rgb stream\'s)')
    group.add_argument('--flow-' + flag[2:], default=StreamPath(default, 'flow'),
                       help=f'two-stream: the flow stream\'s {what}')


def apply_stream(args):
    """Give every path flag left at its default (a StreamPath) the suffix of its stream; returns args."""
    for name, value in vars(args).items():
        if isinstance(value, StreamPath):
            stream = ('flow' if value.role == 'flow' else
                      'rgb' if value.role == 'input' and args.stream == 'two-stream' else args.stream)
            setattr(args, name, stream_path(value, stream))
    return args


def rgb_inputs(path, insize, flow):
    """The RGB stream's input of every frame of a clip, in order: a function that writes it into a batch."""
    for frame in iter_frames(path):
        yield functools.partial(preprocess_frame, frame, insize)


def flow_inputs(path, insize, flow):
    """The flow stream's input of every frame of a clip, in order (its stack of fields, ucf/flow.py)."""
    for _, planes in clip_stacks(iter_frames(path), flow, insize):
        yield functools.partial(stacked, planes)


# What each stream's network reads of a clip's frames (extraction and classifyVideo.py read them alike).
STREAM_INPUTS = {'rgb': rgb_inputs, 'flow': flow_inputs}
