"""Span records (issue 14): a record may cover a contiguous flat span of its tensor.

Round trips over shapes, dtypes, densities and spans; a tensor cut into span records
reads back (joined, indexed, read at random) as the one whole-tensor record would;
malformed spans and badly ordered span records are refused with a clear CodecError
before anything is allocated."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiesfed.protos.codec import (
    CodecError,
    Record,
    SparseTensor,
    StreamReader,
    StreamWriter,
    decode_tensor,
    encode_tensor,
    index_stream,
    iter_records_at,
    join_spans,
    read_record_at,
    read_stream,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_sparse(shape, density, dtype, seed) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    idx = torch.nonzero(torch.rand(numel, generator=g) < density).reshape(-1)
    vals = torch.randn(idx.numel(), generator=g).to(dtype)
    vals[vals == 0] = 1.0
    return SparseTensor("w", tuple(shape), idx, vals)


def cut(t: SparseTensor, bounds: list[int]) -> list[SparseTensor]:
    """`t` as span records [b0, b1), [b1, b2), ... (bounds from 0 to numel)."""
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        a, b = (int(x) for x in torch.searchsorted(t.indices, torch.tensor([lo, hi])))
        out.append(SparseTensor(t.name, t.shape, t.indices[a:b], t.values[a:b], lo, hi - lo))
    return out


def same(a: SparseTensor, b: SparseTensor) -> None:
    assert (a.name, a.shape) == (b.name, b.shape)
    assert b.indices.dtype == torch.int64 and torch.equal(a.indices, b.indices)
    assert a.values.dtype == b.values.dtype and torch.equal(a.values, b.values)


def stream(tensors, header=None) -> bytes:
    buf = io.BytesIO()
    with StreamWriter(buf, header or {"kind": "test"}) as w:
        for t in tensors:
            w.write(t)
    return buf.getvalue()


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


@HSET
@given(shape=shapes, density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 1000), data=st.data())
def test_span_record_round_trip(shape, density, dtype, seed, data):
    whole = random_sparse(shape, density, dtype, seed)
    n = whole.numel
    start = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - start))
    (span,) = cut(whole, [start, start + count])
    got = decode_tensor(encode_tensor(span))
    assert (got.start, got.count, got.stop) == (start, count, start + count)
    same(span, got)  # indices of the whole tensor, not of the span
    assert bool(((got.indices >= start) & (got.indices < start + count)).all())


@HSET
@given(shape=shapes, density=st.sampled_from([0.0, 0.05, 0.4, 1.0]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 1000), data=st.data())
def test_spans_read_back_as_the_whole_tensor(shape, density, dtype, seed, data):
    whole = random_sparse(shape, density, dtype, seed)
    n = whole.numel
    inner = sorted(data.draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=4)) - {n})
    spans = cut(whole, [0, *inner, n])
    other = random_sparse((3,), 0.7, torch.float32, seed + 1)
    other = SparseTensor("z", other.shape, other.indices, other.values)
    data_bytes = stream([other, *spans, other.__class__("y", (2,), torch.tensor([1]), torch.tensor([2.0]))])
    _, it = read_stream(io.BytesIO(data_bytes))
    got = list(it)
    assert [t.name for t in got] == ["z", "w", "y"]
    same(whole, got[1])
    assert got[1].count is None
    _, raw = read_stream(io.BytesIO(data_bytes), spans=True)
    assert [(t.start, t.stop) for t in raw if t.name == "w"] == [(s.start, s.stop) for s in spans]
    _, where = index_stream(io.BytesIO(data_bytes), verify=True)
    assert list(where) == ["z", "w", "y"]
    same(whole, read_record_at(io.BytesIO(data_bytes), *where["w"]))
    same(whole, join_spans(spans))


def test_whole_tensor_records_are_unchanged():
    """No span: the same bytes as before spans existed (no "span" key in the meta)."""
    t = random_sparse((40, 50), 0.2, torch.float32, 0)
    rec = encode_tensor(t)
    assert b'"span"' not in rec
    assert decode_tensor(rec).count is None
    full = SparseTensor("w", t.shape, t.indices, t.values, 0, t.numel)
    assert b'"span":[0,2000]' in encode_tensor(full)


def test_encode_refuses_bad_spans():
    for start, count, match in [(-1, 3, "start must be"), (2, 0, "count >= 1"), (8, 5, "runs past"),
                                (3, None, "without a count")]:
        with pytest.raises(ValueError, match=match):
            encode_tensor(SparseTensor("w", (10,), torch.empty(0, dtype=torch.int64), torch.empty(0), start, count))
    idx = torch.tensor([1, 4, 7])
    with pytest.raises(ValueError, match="below the record's first element"):
        encode_tensor(SparseTensor("w", (10,), idx, torch.ones(3), 2, 6))
    with pytest.raises(ValueError, match="out of range for elements"):
        encode_tensor(SparseTensor("w", (10,), idx, torch.ones(3), 0, 7))
    with pytest.raises(ValueError, match="exceeds the 2 elements"):
        encode_tensor(SparseTensor("w", (10,), torch.tensor([3, 4, 5]), torch.ones(3), 3, 2))


def _forge(rec: bytes, **changes) -> bytes:
    """`rec` with its meta edited (a key set to None is removed); the crc kept valid."""
    _, ml, _ = struct.unpack("<4sIQ", rec[:16])
    meta = json.loads(rec[16:16 + ml])
    payload = rec[16 + ml:]
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    meta["crc32"] = zlib.crc32(payload)
    mb = json.dumps(meta).encode()
    return struct.pack("<4sIQ", b"TREC", len(mb), len(payload)) + mb + payload


@pytest.mark.parametrize("span,match", [
    ([-1, 4], "start must be >= 0"),
    ([0, 0], "count >= 1"),
    ([8, 4], "runs past the tensor's numel=10"),
    ([2, 1], "nnz=3 exceeds the 1 elements"),
    ("0,4", r"'span' must be \[start, count\]"),
    ([1, 2, 3], r"'span' must be \[start, count\]"),
    ([1.0, 4], "must be ints"),
    ([True, 4], "must be ints"),
])
def test_decode_refuses_malformed_spans(span, match):
    rec = encode_tensor(SparseTensor("w", (10,), torch.tensor([4, 5, 6]), torch.ones(3), 4, 4))
    with pytest.raises(CodecError, match=match):
        decode_tensor(_forge(rec, span=span))


def test_decode_bounds_the_index_domain_by_the_span():
    """A "full" index covers the span's count, and a bitmap or varint index may not
    address past it: the decoder allocates for count elements, never numel."""
    rec = encode_tensor(SparseTensor("w", (1000,), torch.arange(10, 14), torch.ones(4), 10, 4))
    assert decode_tensor(rec).indices.tolist() == [10, 11, 12, 13]
    with pytest.raises(CodecError, match="'full' requires"):
        decode_tensor(_forge(rec, span=[10, 5]))
    var = encode_tensor(SparseTensor("w", (1000,), torch.tensor([10, 300]), torch.ones(2), 10, 400))
    with pytest.raises(CodecError, match="out of range|exceeds|index"):
        decode_tensor(_forge(var, span=[10, 100]))  # relative index 290 outside a 100-element span


def _bad_orders():
    whole = SparseTensor("w", (12,), torch.tensor([0, 3, 6, 9, 11]), torch.arange(1.0, 6.0))
    a, b, c = cut(whole, [0, 4, 8, 12])
    other = SparseTensor("o", (2,), torch.tensor([0]), torch.tensor([1.0]))
    overlap = cut(whole, [2, 8])[0]
    return [
        ("gap", [a, c], "leaves a gap: elements \\[4, 8\\)"),
        ("overlap", [a, overlap, c], "overlaps elements already covered"),
        ("duplicate", [a, a, b, c], "overlaps elements already covered"),
        ("out of order", [a, c, b], "leaves a gap"),
        ("late start", [b, c], "starts at element 4, not 0"),
        ("interleaved", [a, other, b, c], "stop at element 4 of 12"),
        ("unfinished", [a, b], "ends inside the tensor: elements \\[8, 12\\)"),
        ("whole after spans", [a, whole], "whole-tensor record after span records"),
    ]


@pytest.mark.parametrize("case,records,match", _bad_orders(), ids=[c[0] for c in _bad_orders()])
def test_bad_span_order_is_refused_by_every_reader(case, records, match):
    data = stream(records)
    with pytest.raises(CodecError, match=match):
        _, it = read_stream(io.BytesIO(data))
        list(it)
    with pytest.raises(CodecError, match=match):
        index_stream(io.BytesIO(data))
    # the incremental reader hands records over one at a time: the order is the
    # receiver's to check (the coordinator does, with the same SpanCover)
    evs = StreamReader().feed(data)
    assert sum(isinstance(e, Record) for e in evs) == len(records)


def test_read_record_at_refuses_a_range_of_part_of_a_tensor():
    whole = SparseTensor("w", (12,), torch.tensor([0, 3, 6, 9, 11]), torch.arange(1.0, 6.0))
    spans = cut(whole, [0, 4, 8, 12])
    data = stream(spans)
    _, where = index_stream(io.BytesIO(data))
    off, length = where["w"]
    f = io.BytesIO(data)
    one = len(encode_tensor(spans[0]))
    first = read_record_at(f, off, one)  # one record: that span, as it is
    assert (first.start, first.count) == (0, 4) and first.indices.tolist() == [0, 3]
    two = one + len(encode_tensor(spans[1]))
    with pytest.raises(CodecError, match="ends inside the tensor"):
        read_record_at(f, off, two)
    with pytest.raises(CodecError, match="starts at element 4"):
        read_record_at(f, off + one, length - one)


def test_join_refuses_mixed_dtypes():
    a = SparseTensor("w", (4,), torch.tensor([0]), torch.tensor([1.0]), 0, 2)
    b = SparseTensor("w", (4,), torch.tensor([3]), torch.tensor([1.0], dtype=torch.float16), 2, 2)
    with pytest.raises(CodecError, match="different dtypes"):
        join_spans([a, b])


def test_iter_records_at_hands_a_tensor_over_span_by_span():
    """A reader applying a tensor span by span holds one span: the range's records come one
    at a time, as they are, interleaved reads of the same file notwithstanding."""
    whole = SparseTensor("w", (12,), torch.tensor([0, 3, 6, 9, 11]), torch.arange(1.0, 6.0))
    other = SparseTensor("o", (2,), torch.tensor([1]), torch.tensor([7.0]))
    data = stream([*cut(whole, [0, 4, 8, 12]), other])
    f = io.BytesIO(data)
    _, where = index_stream(f)
    got = []
    for t in iter_records_at(f, *where["w"]):
        got.append((t.start, t.count, t.indices.tolist()))
        f.seek(0)  # the caller uses the file in between
    assert got == [(0, 4, [0, 3]), (4, 4, [6]), (8, 4, [9, 11])]
    assert [t.name for t in iter_records_at(f, *where["o"])] == ["o"]
    off, length = where["w"]
    with pytest.raises(CodecError, match="ends inside the tensor"):
        list(iter_records_at(f, off, length - len(encode_tensor(cut(whole, [8, 12])[0]))))
