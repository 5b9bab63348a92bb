"""Metadata inside the .tflite: the TFLite Support `TFLITE_METADATA` entry, a JSON entry, labels as a packed file.

A TFLite model may carry named buffers in its `metadata` field (`Model.metadata[i] = {name, buffer}`).
Two entries are written:

- `TFLITE_METADATA`: a `ModelMetadata` FlatBuffer (file identifier `M001`) in the schema that Android's TFLite
  Support library and Android Studio's model binding read (`metadata_schema.fbs`, schema 1.5.0): the input
  image's colour space and size, its normalization as `NormalizationOptions` in pixel units
  (`(pixel - mean) / std`), and the output's labels as an associated file of type `TENSOR_AXIS_LABELS`.
  `tflite-support` (the official writer) needs protobuf < 4, which the pinned stack cannot have, so this module
  writes the few tables it needs with the `flatbuffers` builder; only features of schema version 1.0.0 are used.
- `edgeship_metadata`: the shipped `metadata.json` (less its own hash) as UTF-8 JSON, quantization included.

`labels.txt` is packed into a ZIP archive appended to the model, which is where TFLite Support looks for
associated files. The interpreter ignores bytes after the FlatBuffer, so the model runs unchanged.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import flatbuffers
import numpy as np
from flatbuffers import table

TFLITE_METADATA = "TFLITE_METADATA"
EDGESHIP_METADATA = "edgeship_metadata"
METADATA_FILE_ID = b"M001"
MODEL_FILE_ID = b"TFL3"
MIN_PARSER_VERSION = "1.0.0"
BUFFER_ALIGNMENT = 16  # the TFLite schema's force_align for Buffer.data

# metadata_schema.fbs enum values and union type ids (a union field takes two slots: type, value).
_COLOR_RGB, _COLOR_GRAYSCALE = 1, 2
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2
_PROCESS_NORMALIZATION = 1
_FILE_TENSOR_AXIS_LABELS = 2


def _schema():
    import ai_edge_litert.schema_py_generated as schema  # flatbuffers-generated TFLite schema, no TensorFlow

    return schema


# ---------------------------------------------------------------------------------------------- writing


def _strings(b: flatbuffers.Builder, items: Sequence[str]) -> int:
    offsets = [b.CreateString(s) for s in items]
    return _offsets(b, offsets)


def _offsets(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values: Sequence[float]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependFloat32(float(v))
    return b.EndVector()


def _labels_file(b: flatbuffers.Builder, name: str) -> int:
    n = b.CreateString(name)
    d = b.CreateString("Class names, one per line, in the order of the output scores.")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, n, 0)
    b.PrependUOffsetTRelativeSlot(1, d, 0)
    b.PrependInt8Slot(2, _FILE_TENSOR_AXIS_LABELS, 0)
    return b.EndObject()


def _input_tensor(b: flatbuffers.Builder, meta: Mapping[str, Any]) -> int:
    shape = meta["input"]["shape"]  # NHWC
    height, width, channels = int(shape[1]), int(shape[2]), int(shape[3])
    mean_px = [255.0 * m for m in meta["normalization"]["mean"]]
    std_px = [255.0 * s for s in meta["normalization"]["std"]]
    name = b.CreateString("image")
    desc = b.CreateString(
        f"{height}x{width} {'grayscale' if channels == 1 else 'RGB'} image, NHWC, {meta['input']['dtype']}; "
        "normalized as (pixel - mean) / std with pixel in 0..255"
        + ("; then quantized with the input tensor's scale and zero point" if meta["input"]["dtype"] != "float32"
           else "")
    )  # fmt: skip
    dims = _strings(b, ["batch", "height", "width", "channels"])
    # ImageSize { width, height } and ImageProperties { color_space, default_size }
    b.StartObject(2)
    b.PrependUint32Slot(0, width, 0)
    b.PrependUint32Slot(1, height, 0)
    size = b.EndObject()
    b.StartObject(2)
    b.PrependInt8Slot(0, _COLOR_GRAYSCALE if channels == 1 else _COLOR_RGB, 0)
    b.PrependUOffsetTRelativeSlot(1, size, 0)
    image = b.EndObject()
    # Content { content_properties (union: type slot 0, value slot 1), range }
    b.StartObject(3)
    b.PrependUint8Slot(0, _CONTENT_IMAGE, 0)
    b.PrependUOffsetTRelativeSlot(1, image, 0)
    content = b.EndObject()
    # NormalizationOptions { mean, std } inside ProcessUnit { options (union) }
    mean_v, std_v = _floats(b, mean_px), _floats(b, std_px)
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(0, mean_v, 0)
    b.PrependUOffsetTRelativeSlot(1, std_v, 0)
    norm = b.EndObject()
    b.StartObject(2)
    b.PrependUint8Slot(0, _PROCESS_NORMALIZATION, 0)
    b.PrependUOffsetTRelativeSlot(1, norm, 0)
    unit = b.EndObject()
    units = _offsets(b, [unit])
    # Stats { max, min }: the normalized range of pixels 0..255
    hi = _floats(b, [(255.0 - m) / s for m, s in zip(mean_px, std_px, strict=True)])
    lo = _floats(b, [(0.0 - m) / s for m, s in zip(mean_px, std_px, strict=True)])
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(0, hi, 0)
    b.PrependUOffsetTRelativeSlot(1, lo, 0)
    stats = b.EndObject()
    return _tensor(b, name=name, desc=desc, dims=dims, content=content, units=units, stats=stats)


def _output_tensor(b: flatbuffers.Builder, meta: Mapping[str, Any], labels_name: str) -> int:
    name = b.CreateString("scores")
    desc = b.CreateString(
        f"One score (logit) per class for {len(meta['class_names'])} classes, {meta['output']['dtype']}; "
        "dequantize with the output tensor's scale and zero point when integer; the highest is the prediction"
    )
    b.StartObject(0)  # FeatureProperties {}
    feature = b.EndObject()
    b.StartObject(3)
    b.PrependUint8Slot(0, _CONTENT_FEATURE, 0)
    b.PrependUOffsetTRelativeSlot(1, feature, 0)
    content = b.EndObject()
    files = _offsets(b, [_labels_file(b, labels_name)])
    return _tensor(b, name=name, desc=desc, content=content, files=files)


def _tensor(b: flatbuffers.Builder, *, name: int, desc: int, content: int, dims: int = 0, units: int = 0,
            stats: int = 0, files: int = 0) -> int:  # fmt: skip
    """TensorMetadata { name, description, dimension_names, content, process_units, stats, associated_files }."""
    b.StartObject(7)
    for slot, off in enumerate((name, desc, dims, content, units, stats, files)):
        if off:
            b.PrependUOffsetTRelativeSlot(slot, off, 0)
    return b.EndObject()


def model_metadata_buffer(meta: Mapping[str, Any], *, labels_name: str = "labels.txt") -> bytes:
    """The `ModelMetadata` FlatBuffer (identifier M001) for an image classifier described by `meta`."""
    b = flatbuffers.Builder(1024)
    inp = _input_tensor(b, meta)
    out = _output_tensor(b, meta, labels_name)
    inputs, outputs = _offsets(b, [inp]), _offsets(b, [out])
    sg_name = b.CreateString("main")
    b.StartObject(10)  # SubGraphMetadata
    b.PrependUOffsetTRelativeSlot(0, sg_name, 0)
    b.PrependUOffsetTRelativeSlot(2, inputs, 0)
    b.PrependUOffsetTRelativeSlot(3, outputs, 0)
    subgraph = b.EndObject()
    subgraphs = _offsets(b, [subgraph])
    name = b.CreateString(f"{meta['model']} ({meta['target']}, {meta['precision']})")
    desc = b.CreateString(
        f"Image classifier {meta['model']} pruned, fine-tuned and converted by edgeship for {meta['target']}; "
        f"{meta['precision']} weights."
    )
    version = b.CreateString(str(meta["version"]))
    author = b.CreateString("edgeship")
    parser = b.CreateString(MIN_PARSER_VERSION)
    b.StartObject(8)  # ModelMetadata
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependUOffsetTRelativeSlot(1, desc, 0)
    b.PrependUOffsetTRelativeSlot(2, version, 0)
    b.PrependUOffsetTRelativeSlot(3, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(4, author, 0)
    b.PrependUOffsetTRelativeSlot(7, parser, 0)
    root = b.EndObject()
    b.Finish(root, file_identifier=METADATA_FILE_ID)
    return bytes(b.Output())


def _aligned_buffer_type(schema: Any) -> type:
    class AlignedBufferT(schema.BufferT):
        """Buffer.data packed on a 16-byte boundary, as the converter wrote it (the generated Pack uses 1)."""

        def Pack(self, builder: flatbuffers.Builder) -> int:
            data = None
            if self.data is not None and len(self.data):
                raw = np.asarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(raw), BUFFER_ALIGNMENT)
                builder.head = builder.head - len(raw)
                builder.Bytes[builder.head : builder.head + len(raw)] = raw
                data = builder.EndVector()
            schema.BufferStart(builder)
            if data is not None:
                schema.BufferAddData(builder, data)
            schema.BufferAddOffset(builder, self.offset)
            schema.BufferAddSize(builder, self.size)
            return schema.BufferEnd(builder)

    return AlignedBufferT


def _flatbuffer_end(model: bytes) -> int:
    """Where the FlatBuffer proper ends: an appended ZIP of associated files starts there (or nothing does)."""
    with zipfile.ZipFile(io.BytesIO(model)) as zf:
        starts = [info.header_offset for info in zf.infolist()]
    return min(starts) if starts else len(model)


def strip_associated_files(model: bytes) -> bytes:
    """The model without an appended ZIP archive (a model that has none is returned as it is)."""
    try:
        return model[: _flatbuffer_end(model)]
    except zipfile.BadZipFile:
        return model


def embed_metadata(model: bytes, meta: Mapping[str, Any], *, labels: bytes, labels_name: str = "labels.txt") -> bytes:
    """`model` with TFLITE_METADATA and edgeship_metadata entries (replacing earlier ones) and `labels` packed."""
    schema = _schema()
    flat = strip_associated_files(model)
    m = schema.ModelT.InitFromPackedBuf(bytearray(flat), 0)
    aligned = _aligned_buffer_type(schema)
    buffers = []
    for buf in m.buffers or []:
        if buf.offset > 1:
            raise ValueError("the model keeps its weights outside the FlatBuffer (> 2 GiB models); not rewritten")
        nb = aligned()
        nb.data, nb.offset, nb.size = buf.data, buf.offset, buf.size
        buffers.append(nb)
    entries = {
        TFLITE_METADATA: model_metadata_buffer(meta, labels_name=labels_name),
        EDGESHIP_METADATA: json.dumps(dict(meta), sort_keys=True).encode("utf-8"),
    }
    kept = list(m.metadata or [])
    for name, payload in entries.items():
        nb = aligned()
        nb.data = np.frombuffer(payload, dtype=np.uint8)
        same = [md for md in kept if _name(md.name) == name]
        if same:  # rewrite the entry's own buffer: tensors refer to buffers by index, so none is removed
            buffers[same[0].buffer] = nb
            continue
        buffers.append(nb)
        md = schema.MetadataT()
        md.name, md.buffer = name, len(buffers) - 1
        kept.append(md)
    m.buffers, m.metadata = buffers, kept
    b = flatbuffers.Builder(len(flat) + 4096)
    b.Finish(m.Pack(b), file_identifier=MODEL_FILE_ID)
    out = io.BytesIO(bytes(b.Output()))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as zf:
        info = zipfile.ZipInfo(labels_name, date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, labels)
    return out.getvalue()


def _name(name: bytes | str | None) -> str:
    return name.decode() if isinstance(name, bytes) else (name or "")


# ---------------------------------------------------------------------------------------------- reading


def metadata_entries(model: bytes) -> dict[str, bytes]:
    """Every named metadata buffer of a .tflite file."""
    schema = _schema()
    m = schema.Model.GetRootAs(bytearray(strip_associated_files(model)), 0)
    out = {}
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        buf = m.Buffers(md.Buffer())
        out[_name(md.Name())] = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
    return out


def associated_files(model: bytes) -> dict[str, bytes]:
    """The files packed in the ZIP archive after the model (empty when there is none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    except zipfile.BadZipFile:
        return {}


class _Reader:
    """A field-by-slot reader over one FlatBuffer table (vtable offsets are 4 + 2 * slot)."""

    def __init__(self, buf: bytes | bytearray, pos: int) -> None:
        self.t = table.Table(buf, pos)

    def _off(self, slot: int) -> int:
        return self.t.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str | None:
        o = self._off(slot)
        return self.t.String(o + self.t.Pos).decode() if o else None

    def int8(self, slot: int) -> int:
        o = self._off(slot)
        return self.t.Get(flatbuffers.number_types.Int8Flags, o + self.t.Pos) if o else 0

    def uint32(self, slot: int) -> int:
        o = self._off(slot)
        return self.t.Get(flatbuffers.number_types.Uint32Flags, o + self.t.Pos) if o else 0

    def table(self, slot: int) -> _Reader | None:
        o = self._off(slot)
        return _Reader(self.t.Bytes, self.t.Indirect(o + self.t.Pos)) if o else None

    def tables(self, slot: int) -> list[_Reader]:
        o = self._off(slot)
        if not o:
            return []
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return [_Reader(self.t.Bytes, self.t.Indirect(start + 4 * i)) for i in range(n)]

    def floats(self, slot: int) -> list[float]:
        o = self._off(slot)
        if not o:
            return []
        return [float(v) for v in self.t.GetVectorAsNumpy(flatbuffers.number_types.Float32Flags, o)]


def read_model_metadata(buf: bytes) -> dict[str, Any]:
    """The parts of a `ModelMetadata` buffer this module writes, as a plain dict (for checks and tests)."""
    if buf[4:8] != METADATA_FILE_ID:
        raise ValueError(f"not a ModelMetadata FlatBuffer (identifier {buf[4:8]!r})")
    ba = bytearray(buf)
    root = _Reader(ba, flatbuffers.encode.Get(flatbuffers.packer.uoffset, ba, 0))

    def tensor(t: _Reader) -> dict[str, Any]:
        content = t.table(3)
        norm = [u.table(1) for u in t.tables(4) if u.int8(0) == _PROCESS_NORMALIZATION]
        image = content.table(1) if content is not None and content.int8(0) == _CONTENT_IMAGE else None
        size = image.table(1) if image is not None else None
        return {
            "name": t.string(0),
            "description": t.string(1),
            "color_space": {1: "RGB", 2: "GRAYSCALE"}.get(image.int8(0)) if image is not None else None,
            "size": [size.uint32(1), size.uint32(0)] if size is not None else None,  # height, width
            "mean": norm[0].floats(0) if norm and norm[0] else None,
            "std": norm[0].floats(1) if norm and norm[0] else None,
            "stats": {"max": t.table(5).floats(0), "min": t.table(5).floats(1)} if t.table(5) else None,
            "associated_files": [{"name": f.string(0), "type": f.int8(2)} for f in t.tables(6)],
        }

    subgraphs = root.tables(3)
    return {
        "name": root.string(0),
        "description": root.string(1),
        "version": root.string(2),
        "author": root.string(4),
        "min_parser_version": root.string(7),
        "inputs": [tensor(t) for sg in subgraphs for t in sg.tables(2)],
        "outputs": [tensor(t) for sg in subgraphs for t in sg.tables(3)],
    }
