"""Optical flow, the motion stream's input, computed on the fly from the frames the RGB stream reads (no flow
images on disk, nothing to build: OpenCV from PyPI).

A clip of n frames has n - 1 flow fields, field i from frame i to frame i + 1. Each is computed with OpenCV on
the frames exactly as ucf/video.py decodes them, turned grey (cv2.cvtColor) and resized to the network's input
size (cv2.resize, INTER_AREA): the same squash to a square that preprocess_frame gives the RGB stream, so both
streams see one geometry and a field's vectors are in the network's pixels.

The network's input for frame t is a stack of L (FlowSettings.stack) consecutive fields, their x and y planes
interleaved (2L channels: x0, y0, x1, y1, ...). Each field has its mean vector subtracted (the camera's own
motion, Simonyan & Zisserman 2014) where `subtract_mean`, is clipped to +-`bound` pixels and scaled so that
+-bound spans +-127.5, the range of the RGB stream's mean-subtracted pixels.

The rule at a clip's end: the stack of frame t holds fields s .. s + L - 1 with s = min(t, F - L) (F = n - 1
fields), so every frame gets L consecutive real fields, and the last L frames share the clip's last stack; a clip
with fewer than L fields repeats its last field to fill the stack; a clip of one frame has no flow (FlowError).
"""
import collections
import threading

import numpy as np

from ucf.video import VideoError


class FlowError(VideoError):
    """A clip that has no motion stream (one frame)."""


def _cv2():
    import cv2
    cv2.setNumThreads(1)  # the parallelism is across clips (loader processes, decoder threads), as for decoding
    return cv2


def _dis(preset):
    def make():
        cv2 = _cv2()
        algorithm = cv2.DISOpticalFlow_create(getattr(cv2, f'DISOPTICAL_FLOW_PRESET_{preset}'))
        return lambda a, b: algorithm.calc(a, b, None)
    return make


def _farneback():
    cv2 = _cv2()
    # pyramid scale 0.5, 3 levels, window 15, 3 iterations, polynomial of 5 pixels with sigma 1.2: OpenCV's
    # documented example, the usual choice
    return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


# The flow algorithms --flow-algorithm offers: how to make one (per thread: OpenCV's objects keep state between
# calls), and what it is. tools/bench.py measures each (time per field at 320x240 on one thread, endpoint error
# against the synthetic set's true motion); docs/BENCHMARKS.md has the numbers behind the default.
Algorithm = collections.namedtuple('Algorithm', 'make help')
FLOW_ALGORITHMS = {
    'dis-ultrafast': Algorithm(_dis('ULTRAFAST'), "OpenCV's DIS, preset ultrafast (Kroeger et al. 2016)"),
    'dis-fast': Algorithm(_dis('FAST'), "OpenCV's DIS, preset fast"),
    'dis-medium': Algorithm(_dis('MEDIUM'), "OpenCV's DIS, preset medium (variational refinement)"),
    'farneback': Algorithm(_farneback, "OpenCV's Farneback (polynomial expansion, 2003)"),
}

# What the flow stream's input is: part of a flow model's record and of its extraction's identity.
FlowSettings = collections.namedtuple('FlowSettings', 'algorithm stack bound subtract_mean')
DEFAULT_FLOW = FlowSettings('dis-fast', 10, 20.0, True)
FLOW_PREPROCESSING = ('grey (cv2.cvtColor of the decoded RGB) -> cv2.resize INTER_AREA to the input size -> flow '
                      '-> minus its mean vector (if subtract_mean) -> clip +-bound -> x 127.5/bound (flow stack v1)')

_ALGORITHMS = threading.local()


def add_flow_flags(group):
    """The flags that make a flow model's input (fine-tuning sets them; its model records them; extraction reads
    them from the model)."""
    from ucf.flags import positive_float, positive_int
    group.add_argument('--flow-algorithm', default=DEFAULT_FLOW.algorithm, choices=list(FLOW_ALGORITHMS),
                       help='; '.join(f'{k}: {a.help}' for k, a in FLOW_ALGORITHMS.items())
                       + ' (docs/BENCHMARKS.md: speed and endpoint error of each)')
    group.add_argument('--flow-stack', type=positive_int, default=DEFAULT_FLOW.stack,
                       help='L, the flow fields stacked into one input (2L channels)')
    group.add_argument('--flow-bound', type=positive_float, default=DEFAULT_FLOW.bound,
                       help='flow is clipped to +- this many pixels of the input size, which span the input range')
    group.add_argument('--no-mean-subtraction', action='store_true',
                       help="keep each field's mean vector (by default it is subtracted: the camera's motion)")


def flow_settings(args):
    return FlowSettings(args.flow_algorithm, args.flow_stack, args.flow_bound, not args.no_mean_subtraction)


def flow_field(first, second, algorithm):
    """The flow field (H x W x 2 float32, x then y) from grey frame `first` to `second`, by this thread's
    instance of the algorithm."""
    made = _ALGORITHMS.__dict__
    if algorithm not in made:
        made[algorithm] = FLOW_ALGORITHMS[algorithm].make()
    return made[algorithm](first, second)


def grey(rgb, size):
    """An HxWx3 uint8 RGB frame as the size x size grey image flow is computed on."""
    cv2 = _cv2()
    return cv2.resize(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY), (size, size),
                      interpolation=cv2.INTER_AREA)


def network_input(field, settings):
    """A flow field as two planes of the network's input (2 x H x W float32): mean subtracted, clipped, scaled."""
    planes = np.empty((2,) + field.shape[:2], np.float32)
    for c in range(2):  # the field's x and y, each read once (strided) into its own contiguous plane
        planes[c] = field[..., c]
        if settings.subtract_mean:
            planes[c] -= planes[c].mean()
    np.clip(planes, -settings.bound, settings.bound, out=planes)
    planes *= 127.5 / settings.bound
    return planes


def stack_fields(t, n_fields, stack):
    """The fields (indices) in the stack of frame t of a clip of n_fields fields: the end rule above."""
    start = max(0, min(t, n_fields - stack))
    return [min(start + k, n_fields - 1) for k in range(stack)]


def frames_for_stack(t, n_frames, stack):
    """(first frame, frame count) that the stack of frame t is computed from, in a clip of n_frames frames."""
    fields = stack_fields(t, n_frames - 1, stack)
    return fields[0], fields[-1] - fields[0] + 2


def stack_from_frames(frames, first, t, n_frames, settings, size, out=None):
    """The stack of frame t (2L x size x size float32, into `out` if given) from RGB frames (arrays or Frames)
    that start at frame `first` and hold those that frames_for_stack names: what fine-tuning reads at random
    places."""
    if n_frames < 2:
        raise FlowError('the clip', 'one frame: no motion to compute flow from')
    fields = clip_fields(frames, settings, size)  # fields first .. first + len(frames) - 2
    return stacked(fields[[i - first for i in stack_fields(t, n_frames - 1, settings.stack)]], out)


def clip_fields(frames, settings, size):
    """The network's planes of every field of a clip (fields x 2 x size x size float32), from all its RGB frames
    (fine-tuning's cache: each field computed once)."""
    greys = [grey(_rgb_of(f), size) for f in frames]
    out = np.empty((max(len(greys) - 1, 0), 2, size, size), np.float32)
    for i, (a, b) in enumerate(zip(greys, greys[1:])):
        out[i] = network_input(flow_field(a, b, settings.algorithm), settings)
    return out


def stacked(planes, out=None):
    """L fields' planes (each 2 x H x W) as one stack, x and y interleaved (into `out` if given)."""
    if out is None:
        out = np.empty((2 * len(planes),) + planes[0].shape[1:], np.float32)
    for k, p in enumerate(planes):
        out[2 * k:2 * k + 2] = p
    return out


def clip_stacks(frames, settings, size):
    """(frame index, its stack's fields: L planes of 2 x size x size) for every frame of a clip in order, from
    its RGB frames in order (an iterator: a clip is streamed), each field computed once; `stacked` makes the
    network's input of them. Memory holds L + 1 fields, whatever the clip's length; the stacks of the last frames
    wait for the clip's end, which the end rule needs. A clip of one frame raises FlowError."""
    pending = collections.deque()  # the newest fields' planes; pending[0] is field `first_field`
    previous, n_frames, n_fields, first_field, t, stack = None, 0, 0, 0, 0, settings.stack
    for frame in frames:
        current = grey(_rgb_of(frame), size)
        if previous is not None:
            pending.append(network_input(flow_field(previous, current, settings.algorithm), settings))
            n_fields += 1
            while n_fields >= t + stack:  # frame t's stack is fields t .. t + L - 1, wherever the clip ends
                yield t, [pending[t - first_field + k] for k in range(stack)]
                t += 1
            while len(pending) > stack:  # the end rule's stacks need no more than the last L fields
                pending.popleft()
                first_field += 1
        previous, n_frames = current, n_frames + 1
    if n_frames == 1:  # none: the caller says nothing decoded
        raise FlowError('the clip', 'one frame: no motion to compute flow from')
    for t in range(t, n_frames):
        yield t, [pending[i - first_field] for i in stack_fields(t, n_fields, stack)]


def _rgb_of(frame):
    return frame.rgb if hasattr(frame, 'rgb') else frame
