"""Caffe's .caffemodel, read straight from its protobuf wire format: a blob's floats are one packed field, read
into numpy in one call (13 min and 6.4 GB with the pure-Python protobuf library for the 553 MB file, which builds
a Python float per weight). Field numbers from caffe.proto. VGGNet.py turns the layers into VGG16's parameters."""
import os

import numpy as np

from ucf.errors import DataError

NET_LAYER, NET_LAYERS_V1 = 100, 2
LAYER_NAME, LAYER_BLOBS = {NET_LAYER: 1, NET_LAYERS_V1: 4}, {NET_LAYER: 7, NET_LAYERS_V1: 6}
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH, BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 1, 2, 3, 4, 5, 7, 8
SHAPE_DIM = 1


class _Wire:
    """Protobuf fields of a file, read with pread: only keys and lengths are parsed, payloads are skipped."""

    def __init__(self, f, path):
        self.fd, self.path, self.size = f.fileno(), path, os.fstat(f.fileno()).st_size

    def bad(self, what, end=None):
        if end == self.size:  # what was read runs into the end of the file: the file was cut short
            return DataError(f'{self.path}: the caffemodel is cut short ({what}, {self.size:,} bytes); download '
                             'it again (VGG_ILSVRC_16_layers.caffemodel is about 553 MB)')
        return DataError(f'{self.path}: not a caffemodel ({what})')

    def varint(self, at, end):
        data = os.pread(self.fd, 10, at)
        value = 0
        for i, byte in enumerate(data):
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if at + i + 1 > end:
                    break
                return value, at + i + 1
        raise self.bad(f'a number at byte {at:,} runs past the end of its message', end)

    def fields(self, start, end):
        """(field number, wire type, value): an int for varints, (start, end) of the payload otherwise."""
        at = start
        while at < end:
            key, at = self.varint(at, end)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, at = self.varint(at, end)
            elif wire in (1, 5):
                value, at = (at, at + (8 if wire == 1 else 4)), at + (8 if wire == 1 else 4)
            elif wire == 2:
                length, at = self.varint(at, end)
                value, at = (at, at + length), at + length
            else:
                raise self.bad(f'field {field} of unknown wire type {wire} at byte {at:,}')
            if field == 0:
                raise self.bad(f'field number 0 at byte {at:,}')
            if at > end:
                raise self.bad(f'field {field} runs past the end of its message at byte {end:,}', end)
            yield field, wire, value

    def numbers(self, wire, value, dtype):
        """A repeated numeric field: packed (one payload) or not (one element per field)."""
        start, end = value
        if wire == 2 and (end - start) % np.dtype(dtype).itemsize:
            raise self.bad(f'a packed array of {end - start} bytes')
        data = os.pread(self.fd, end - start, start)
        return np.frombuffer(data, dtype)


def _blob(wire, start, end):
    dims, legacy, parts = None, [0, 0, 0, 0], []
    for field, kind, value in wire.fields(start, end):
        if field == BLOB_SHAPE:
            dims = []
            for dim_field, dim_kind, dim in wire.fields(*value):
                if dim_field == SHAPE_DIM:
                    dims += [dim] if dim_kind == 0 else _packed_varints(wire, dim)
        elif field in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH) and kind == 0:
            legacy[field - BLOB_NUM] = value
        elif field == BLOB_DATA:
            parts.append(wire.numbers(kind, value, '<f4'))
        elif field == BLOB_DOUBLE_DATA:
            parts.append(wire.numbers(kind, value, '<f8').astype(np.float32))
    data = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, np.float32)
    shape = tuple(dims) if dims else tuple(legacy)
    if int(np.prod(shape)) != data.size:
        raise wire.bad(f'a blob of shape {shape} holds {data.size} numbers')
    return data.astype(np.float32).reshape(shape)


def _packed_varints(wire, span):
    values, at = [], span[0]
    while at < span[1]:
        value, at = wire.varint(at, span[1])
        values.append(value)
    return values


def caffemodel_layers(path):
    """{layer name: [blob arrays]} of every layer with weights in a caffemodel, old (`layers`,
    num/channels/height/width) or new (`layer`, shape.dim) layout, exact to the bit. DataError for a truncated
    file or a file of another kind (VGGNet.params_from_caffemodel checks the architecture)."""
    with open(path, 'rb') as f:
        wire = _Wire(f, path)
        layers = {}
        for field, kind, value in wire.fields(0, wire.size):
            if field not in (NET_LAYER, NET_LAYERS_V1) or kind != 2:
                continue
            name, blobs = None, []
            for sub, sub_kind, sub_value in wire.fields(*value):
                if sub == LAYER_NAME[field] and sub_kind == 2:
                    name = os.pread(wire.fd, sub_value[1] - sub_value[0], sub_value[0]).decode('utf-8', 'replace')
                elif sub == LAYER_BLOBS[field] and sub_kind == 2:
                    blobs.append(_blob(wire, *sub_value))
            if blobs:
                layers[name] = blobs
    return layers
