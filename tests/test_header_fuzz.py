"""Property and example tests for safetensors header validation (surgery.header via surgery.checkpoint).

Valid files come from the reference writer (`safetensors.numpy`); corrupted files are checked against
the reference reader (`safetensors.safe_open`): whenever our reader accepts a file, the reference reader
must accept it too and agree on names, dtypes and shapes. Anything we reject must be a SurgeryError that
names the file.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open
from safetensors.numpy import save as st_save
from safetensors.numpy import save_file as st_save_file

from surgery.checkpoint import open_checkpoint, read_header
from surgery.errors import SurgeryError

REPO = Path(__file__).resolve().parents[1]

#: numpy dtype -> safetensors dtype string, as the format spec names them
NUMPY_TO_ST = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
}

#: seconds one header parse may take on the small inputs used here before we call it a hang
PARSE_SECONDS = 2.0

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])

_counter = itertools.count()


# ----------------------------------------------------------------------------------------------- helpers


def raw_file(header: str | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file from header text and data; `n` overrides the length prefix."""
    h = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write(folder: Path, content: bytes, name: str | None = None) -> Path:
    """Write `content` as a .safetensors file alone in a fresh sub-folder."""
    sub = folder / f"case{next(_counter)}"
    sub.mkdir()
    path = sub / (name or "model.safetensors")
    path.write_bytes(content)
    return path


def reference(path: Path):
    """What the reference reader sees: {name: (dtype, shape)} or None if it refuses the file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {}
            for k in f.keys():
                try:
                    s = f.get_slice(k)
                    out[k] = (s.get_dtype(), tuple(s.get_shape()))
                except Exception:  # a dtype numpy lacks: the header was still accepted
                    out[k] = None
            return out
    except Exception:
        return None


def ours(path: Path):
    """Open with our reader, timing it; return ('ok', checkpoint) or ('error', SurgeryError)."""
    start = time.monotonic()
    try:
        result = ("ok", open_checkpoint(path))
    except SurgeryError as exc:
        result = ("error", exc)
    elapsed = time.monotonic() - start
    assert elapsed < PARSE_SECONDS, f"parsing took {elapsed:.1f}s"
    return result


def check_against_reference(path: Path) -> str:
    """The core property: ours accepts => reference accepts and agrees; ours rejects => SurgeryError naming the file."""
    kind, value = ours(path)
    if kind == "error":
        assert str(path) in str(value), f"message does not name the file: {value}"
        assert "\n" not in str(value)
        return "error"
    ref = reference(path)
    assert ref is not None, f"we accepted a file the reference reader refuses: {path.read_bytes()[:300]!r}"
    assert set(value.tensors) == set(ref)
    for name, info in value.tensors.items():
        if ref[name] is not None:
            assert (info.dtype, info.shape) == ref[name]
    return "ok"


def expect_error(path: Path, *fragments: str) -> SurgeryError:
    with pytest.raises(SurgeryError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


def split(content: bytes) -> tuple[dict, bytes]:
    """(header object, data) of a valid file."""
    n = struct.unpack("<Q", content[:8])[0]
    return json.loads(content[8:8 + n]), content[8 + n:]


def rebuild(header: dict, data: bytes) -> bytes:
    return raw_file(json.dumps(header), data)


# ----------------------------------------------------------------------------------------------- strategies

names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(lambda s: s != "__metadata__")
arrays = hnp.arrays(
    dtype=st.sampled_from(sorted(NUMPY_TO_ST, key=str)),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
tensor_dicts = st.dictionaries(names, arrays, min_size=0, max_size=5)
metadatas = st.one_of(st.none(), st.dictionaries(names, st.text(max_size=10), max_size=3))


@st.composite
def valid_files(draw, min_size=1):
    tensors = draw(st.dictionaries(names, arrays, min_size=min_size, max_size=5))
    metadata = draw(metadatas)
    return st_save(tensors, metadata=metadata)


def junk(bound: int):
    """Arbitrary JSON values (integers within +-bound)."""
    return st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-bound, bound), st.floats(), st.text(max_size=5)),
        lambda children: st.one_of(st.lists(children, max_size=3),
                                   st.dictionaries(st.text(max_size=5), children, max_size=3)),
        max_leaves=6,
    )


json_junk = junk(2**70)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------------------------- valid files


@settings(max_examples=120, deadline=None)
@given(tensors=tensor_dicts, metadata=metadatas, via_file=st.booleans())
def test_reference_written_files_read_back(workdir, tensors, metadata, via_file):
    # safetensors 0.8 itself writes invalid JSON (`{},"__metadata__":{}}`) for no tensors and empty metadata
    assume(tensors or metadata != {})
    folder = workdir / f"valid{next(_counter)}"
    folder.mkdir()
    path = folder / "model.safetensors"
    if via_file:
        st_save_file(tensors, str(path), metadata=metadata)
    else:
        path.write_bytes(st_save(tensors, metadata=metadata))
    content = path.read_bytes()

    for source in (path, folder):
        ckpt = open_checkpoint(source)
        assert set(ckpt.tensors) == set(tensors)
        for name, arr in tensors.items():
            info = ckpt.tensors[name]
            assert info.name == name
            assert info.file == "model.safetensors"
            assert info.dtype == NUMPY_TO_ST[arr.dtype]
            assert info.shape == arr.shape
            assert info.nbytes == arr.nbytes
            assert content[info.offset:info.offset + info.nbytes] == arr.tobytes()
    header = read_header(path)
    assert header.metadata == (metadata or {})
    assert header.data_start == 8 + struct.unpack("<Q", content[:8])[0]


# ----------------------------------------------------------------------------------------------- random corruption


@FAST
@given(content=valid_files(), data=st.data())
def test_truncation_anywhere(workdir, content, data):
    cut = data.draw(st.integers(0, len(content) - 1))
    path = write(workdir, content[:cut])
    # every byte of a valid file is needed: a cut lands in the prefix, the header or the data
    assert check_against_reference(path) == "error"


@settings(max_examples=150, deadline=None)
@given(content=valid_files(), data=st.data())
def test_flipped_header_bytes(workdir, content, data):
    n = struct.unpack("<Q", content[:8])[0]
    flips = data.draw(st.lists(st.tuples(st.integers(8, 8 + n - 1), st.integers(1, 255)), min_size=1, max_size=3))
    mutated = bytearray(content)
    for position, mask in flips:
        mutated[position] ^= mask
    check_against_reference(write(workdir, bytes(mutated)))


@FAST
@given(content=valid_files(), data=st.data())
def test_lying_length_prefix(workdir, content, data):
    n = struct.unpack("<Q", content[:8])[0]
    lie = data.draw(st.one_of(
        st.integers(0, 2**64 - 1),
        st.integers(max(0, n - 16), n + 16),
        st.sampled_from([2**63, 2**64 - 1, 100_000_000, 100_000_001, len(content), len(content) - 8]),
    ))
    assume(lie != n)
    path = write(workdir, struct.pack("<Q", lie) + content[8:])
    check_against_reference(path)


def lie_about(workdir, content, data, field: str, values) -> None:
    """Replace `field` of one random tensor entry with a drawn value; the reader must agree with the reference."""
    header, payload = split(content)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    header[name][field] = data.draw(values(header[name], len(payload)))
    check_against_reference(write(workdir, rebuild(header, payload)))


@FAST
@given(content=valid_files(), data=st.data())
def test_lying_data_offsets(workdir, content, data):
    lie_about(workdir, content, data, "data_offsets", lambda entry, size: st.one_of(
        st.lists(st.integers(-3, size + 3), min_size=2, max_size=2),
        st.lists(st.integers(-(2**70), 2**70), min_size=2, max_size=2),
        json_junk,
    ))


@FAST
@given(content=valid_files(), data=st.data())
def test_lying_shape(workdir, content, data):
    dims = st.one_of(
        st.integers(-3, 10),
        st.integers(-(2**62), 2**15),
        st.integers(-(2**70), 2**70),
        st.booleans(),
        st.floats(),
        st.text(max_size=3),
        st.none(),
    )
    lie_about(workdir, content, data, "shape", lambda entry, size: st.one_of(st.lists(dims, max_size=4), junk(2**20)))


@FAST
@given(content=valid_files(), data=st.data())
def test_lying_dtype(workdir, content, data):
    lie_about(workdir, content, data, "dtype", lambda entry, size: st.one_of(
        st.sampled_from(["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64",
                         "F64", "C64", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "f32", "F128", "Q4", "", "float32"]),
        json_junk,
    ))


@FAST
@given(content=valid_files(), data=st.data())
def test_gaps_and_overlaps(workdir, content, data):
    def shifted(entry, size):
        begin, end = entry["data_offsets"]
        return st.integers(-8, 8).filter(bool).map(lambda shift: [begin + shift, end + shift])

    lie_about(workdir, content, data, "data_offsets", shifted)


@FAST
@given(content=valid_files(), extra=st.binary(min_size=1, max_size=16), cut=st.integers(1, 16), grow=st.booleans())
def test_trailing_or_missing_data_bytes(workdir, content, extra, cut, grow):
    header, payload = split(content)
    assume(grow or len(payload) >= cut)
    payload = payload + extra if grow else payload[:-cut]
    assert check_against_reference(write(workdir, rebuild(header, payload))) == "error"


@FAST
@given(content=valid_files(), metadata=json_junk)
def test_metadata_values(workdir, content, metadata):
    header, payload = split(content)
    header["__metadata__"] = metadata
    outcome = check_against_reference(write(workdir, rebuild(header, payload)))
    if isinstance(metadata, dict) and any(not isinstance(v, str) for v in metadata.values()):
        assert outcome == "error"


@FAST
@given(content=valid_files(), data=st.data())
def test_duplicate_keys_always_rejected(workdir, content, data):
    header, payload = split(content)
    names_ = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names_))
    other = data.draw(st.sampled_from(names_))
    # a second entry under an existing name, either identical or copied from another tensor
    pieces = [json.dumps(k) + ":" + json.dumps(v) for k, v in header.items()]
    pieces.insert(data.draw(st.integers(0, len(pieces))), json.dumps(name) + ":" + json.dumps(header[other]))
    path = write(workdir, raw_file("{" + ",".join(pieces) + "}", payload))
    assert ours(path)[0] == "error"
    expect_error(path, "duplicate")


@FAST
@given(header=json_junk, data=st.binary(max_size=16))
def test_arbitrary_json_headers(workdir, header, data):
    check_against_reference(write(workdir, raw_file(json.dumps(header), data)))


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=64))
def test_arbitrary_bytes(workdir, blob):
    check_against_reference(write(workdir, blob))


# ----------------------------------------------------------------------------------------------- examples

U8_2 = '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'


def test_example_valid_baseline(tmp_path):
    """The hand-built baseline the examples below corrupt is itself accepted (by both readers)."""
    path = write(tmp_path, raw_file(U8_2, b"xy"))
    assert check_against_reference(path) == "ok"
    info = open_checkpoint(path).tensors["a"]
    assert (info.dtype, info.shape, info.offset, info.nbytes) == ("U8", (2,), 8 + len(U8_2), 2)


@pytest.mark.parametrize("cut", [0, 1, 7])
def test_example_shorter_than_prefix(tmp_path, cut):
    expect_error(write(tmp_path, raw_file(U8_2, b"xy")[:cut]), "8 bytes")


def test_example_truncated_in_header(tmp_path):
    content = raw_file(U8_2, b"xy")
    expect_error(write(tmp_path, content[:20]), "header length")


def test_example_truncated_in_data(tmp_path):
    content = raw_file(U8_2, b"xy")
    expect_error(write(tmp_path, content[:-1]), "past the end")


def test_example_flipped_byte_breaks_json(tmp_path):
    content = bytearray(raw_file(U8_2, b"xy"))
    content[8] = ord("[")
    expect_error(write(tmp_path, bytes(content)), "json")


def test_example_invalid_utf8(tmp_path):
    content = raw_file(U8_2.replace('"a"', '"\xff"').encode("latin-1"), b"xy")
    expect_error(write(tmp_path, content), "utf-8")


def test_example_not_an_object(tmp_path):
    expect_error(write(tmp_path, raw_file("[]")), "object")


def test_example_entry_not_an_object(tmp_path):
    expect_error(write(tmp_path, raw_file('{"a": [1, 2]}')), "'a'")


def test_example_missing_field(tmp_path):
    expect_error(write(tmp_path, raw_file('{"a":{"dtype":"U8","shape":[2]}}', b"xy")), "'a'")


@pytest.mark.parametrize("offsets, fragment", [
    ([0, 3], "'a'"),          # span longer than the shape says
    ([0, 1], "'a'"),          # span shorter
    ([2, 0], "'a'"),          # end before begin
    ([1, 3], "gap"),          # gap at the start
    ([0], "'a'"),             # one number
    ([0, 2, 4], "'a'"),
    (["0", "2"], "'a'"),
    ([0.0, 2.0], "'a'"),
    ([-1, 1], "'a'"),
    ([True, 3], "'a'"),
    (None, "'a'"),
])
def test_example_lying_data_offsets(tmp_path, offsets, fragment):
    header = json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": offsets}})
    expect_error(write(tmp_path, raw_file(header, b"xy")), fragment)


@pytest.mark.parametrize("shape", [[3], [1], [2, 2], [], [2, 0]])
def test_example_lying_shape(tmp_path, shape):
    header = json.dumps({"a": entry("U8", shape, 0, 2)})
    expect_error(write(tmp_path, raw_file(header, b"xy")), "'a'")


@pytest.mark.parametrize("shape", [[True, 2], [2, True], [False], [-2], [-1, -2], [2.0], [1.5], ["2"], [[2]], [None],
                                   "2", 2, None, {"0": 2}])
def test_example_bad_shape_entries(tmp_path, shape):
    header = json.dumps({"a": entry("U8", shape, 0, 2)})
    path = write(tmp_path, raw_file(header, b"xy"))
    expect_error(path, "'a'", "shape")
    assert reference(path) is None


@pytest.mark.parametrize("n", [2**63, 2**64 - 1, 100_000_001, 10**12])
def test_example_huge_length_prefix(tmp_path, n):
    path = write(tmp_path, raw_file(U8_2, b"xy", n=n))
    start = time.monotonic()
    expect_error(path, "header length")
    assert time.monotonic() - start < PARSE_SECONDS


@pytest.mark.parametrize("delta", [1, 2, 100])
def test_example_length_prefix_past_end(tmp_path, delta):
    content = raw_file(U8_2, b"xy")
    n = len(U8_2) + 2 + delta  # into and past the data
    expect_error(write(tmp_path, struct.pack("<Q", n) + content[8:]), "header length")


@pytest.mark.parametrize("delta", [-1, -10, 1, 2])
def test_example_length_prefix_lies_within_file(tmp_path, delta):
    """N still inside the file but wrong: the JSON is cut short, or swallows data bytes."""
    content = raw_file(U8_2, b"xy")
    path = write(tmp_path, struct.pack("<Q", len(U8_2) + delta) + content[8:])
    expect_error(path)
    assert reference(path) is None


@pytest.mark.parametrize("header", [
    '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
    '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}',
    '{"a":{"dtype":"U8","dtype":"I8","shape":[2],"data_offsets":[0,2]}}',
    '{"__metadata__":{"k":"v","k":"w"},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
    '{"__metadata__":{},"__metadata__":{},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
])
def test_example_duplicate_keys(tmp_path, header):
    expect_error(write(tmp_path, raw_file(header, b"xy")), "duplicate")


def test_example_trailing_bytes(tmp_path):
    path = write(tmp_path, raw_file(U8_2, b"xyz"))
    expect_error(path, "trailing")
    assert reference(path) is None


def test_example_trailing_bytes_after_empty_header(tmp_path):
    path = write(tmp_path, raw_file("{}", b"z"))
    expect_error(path, "trailing")
    assert reference(path) is None


def test_example_gap_between_tensors(tmp_path):
    header = json.dumps({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 3, 5)})
    path = write(tmp_path, raw_file(header, b"xyzuv"))
    expect_error(path, "gap", "'b'")
    assert reference(path) is None


def test_example_overlapping_tensors(tmp_path):
    header = json.dumps({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 1, 3)})
    path = write(tmp_path, raw_file(header, b"xyz"))
    expect_error(path, "overlap")
    assert reference(path) is None


def test_example_identical_offsets_overlap(tmp_path):
    header = json.dumps({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 0, 2)})
    path = write(tmp_path, raw_file(header, b"xy"))
    expect_error(path, "overlap")
    assert reference(path) is None


def test_example_empty_tensor_outside_buffer(tmp_path):
    header = json.dumps({"a": entry("U8", [2], 0, 2), "b": entry("U8", [0], 5, 5)})
    path = write(tmp_path, raw_file(header, b"xy"))
    expect_error(path, "'b'")
    assert reference(path) is None


@pytest.mark.parametrize("dtype", ["F128", "f32", "u8", "", "float32", "Q4_K", 7, None, ["U8"]])
def test_example_unknown_dtype(tmp_path, dtype):
    header = json.dumps({"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}})
    path = write(tmp_path, raw_file(header, b"xy"))
    expect_error(path, "dtype")
    assert reference(path) is None


def test_example_sub_byte_dtype_must_fill_bytes(tmp_path):
    odd = write(tmp_path, raw_file(json.dumps({"a": entry("F4", [3], 0, 2)}), b"xy"))
    expect_error(odd, "'a'")
    even = write(tmp_path, raw_file(json.dumps({"a": entry("F4", [4], 0, 2)}), b"xy"))
    assert check_against_reference(even) == "ok"


@pytest.mark.parametrize("metadata", [{"format": 1}, {"format": None}, {"format": ["pt"]}, {"a": {"b": "c"}},
                                      {"a": True}, {"a": 1.5}, [], "pt", 1])
def test_example_metadata_not_string_values(tmp_path, metadata):
    header = json.dumps({"__metadata__": metadata, "a": entry("U8", [2], 0, 2)})
    expect_error(write(tmp_path, raw_file(header, b"xy")), "__metadata__")


def test_example_deeply_nested_json(tmp_path):
    depth = 200_000
    header = '{"a":' + "[" * depth + "]" * depth + "}"
    start = time.monotonic()
    expect_error(write(tmp_path, raw_file(header)))
    assert time.monotonic() - start < PARSE_SECONDS


def test_example_huge_integer_literal(tmp_path):
    header = '{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,2]}}'
    expect_error(write(tmp_path, raw_file(header, b"xy")))


def test_example_nan_and_infinity_literals(tmp_path):
    for literal in ("NaN", "Infinity", "-Infinity"):
        header = '{"a":{"dtype":"U8","shape":[' + literal + '],"data_offsets":[0,2]}}'
        expect_error(write(tmp_path, raw_file(header, b"xy")))


# --- engine bugs found while writing these tests (see the report): each is a file the reference rejects.


def test_example_astronomical_shape_is_a_surgery_error(tmp_path):
    """A shape whose byte count does not fit a float must still give SurgeryError (not OverflowError)."""
    header = json.dumps({"a": entry("U8", [2**600, 2**600], 0, 2)})
    path = write(tmp_path, raw_file(header, b"xy"))
    assert reference(path) is None
    expect_error(path, "'a'")


@pytest.mark.parametrize("shape", [[2**64, 0], [2**70, 0], [0, 2**64], [2**40, 2**40, 0], [2**32, 2**32, 0]])
def test_example_shape_overflowing_u64_is_rejected(tmp_path, shape):
    """Dimensions or element counts that overflow 64 bits: the reference refuses them even when a 0 makes numel 0."""
    path = write(tmp_path, raw_file(json.dumps({"a": entry("U8", shape, 0, 0)})))
    assert reference(path) is None
    expect_error(path, "'a'")


def test_example_lone_surrogate_name_is_rejected(tmp_path):
    r"""`"\ud800"` is not a Unicode string: the reference rejects it; accepting it makes names that cannot be encoded."""
    path = write(tmp_path, raw_file('{"\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy"))
    assert reference(path) is None
    expect_error(path)


@pytest.mark.parametrize("header, data", [
    ('{"a":{"dtype":"U8","shape":[-0,2],"data_offsets":[0,0]}}', b""),
    ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[-0,2]}}', b"xy"),
])
def test_example_negative_zero_is_not_an_integer(tmp_path, header, data):
    """`-0` is a float to the reference reader (serde_json), so it refuses it as a shape entry or offset."""
    path = write(tmp_path, raw_file(header, data))
    assert reference(path) is None
    expect_error(path, "'a'")


# ----------------------------------------------------------------------------------------------- resources

_PROBE = textwrap.dedent("""
    import json, resource, sys
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.path.insert(0, sys.argv[2])
    from surgery.checkpoint import read_header
    from surgery.errors import SurgeryError
    out = {}
    for path in sys.argv[3:]:
        try:
            read_header(__import__("pathlib").Path(path))
            out[path] = "ok"
        except SurgeryError:
            out[path] = "SurgeryError"
        except BaseException as exc:
            out[path] = type(exc).__name__
    print(json.dumps(out))
""")


def run_probe(paths: list[Path], timeout: float) -> dict[str, str]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(320 << 20), str(REPO), *map(str, paths)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sparse_file(path: Path, n: int, size: int) -> Path:
    """A file whose length prefix is `n`, a `{` and then a hole up to `size` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + b"{")
    os.truncate(path, size)
    return path


def test_lying_sizes_allocate_nothing_big(tmp_path):
    """Headers claiming huge sizes are refused under a 320 MiB address-space limit (no big read or buffer).

    The interpreter with numpy imported takes ~120 MiB; reading and decoding a 100 MB header would not fit.
    """
    paths = [
        # the file really is long enough for these N: only the 100,000,000-byte limit stops the read
        sparse_file(tmp_path / "over_limit" / "model.safetensors", 100_000_001, 8 + 100_000_001 + 16),
        sparse_file(tmp_path / "way_over" / "model.safetensors", 2**40, 8 + 2**40),
    ]
    cases = {
        "n63": raw_file(U8_2, b"xy", n=2**63),
        "nmax": raw_file(U8_2, b"xy", n=2**64 - 1),
        "nlimit": raw_file(U8_2, b"xy", n=99_999_999),
        "offsets": raw_file(json.dumps({"a": entry("U8", [2**62], 0, 2**62)}), b"xy"),
        "shape": raw_file(json.dumps({"a": entry("F64", [2**31, 2**31], 0, 2)}), b"xy"),
        "count": raw_file(json.dumps({f"t{i}": entry("U8", [2**40], i * 2**40, (i + 1) * 2**40) for i in range(1000)})),
    }
    paths += [write(tmp_path, content, f"{key}.safetensors") for key, content in cases.items()]
    start = time.monotonic()
    result = run_probe(paths, timeout=30)
    assert time.monotonic() - start < 15
    assert result == {str(p): "SurgeryError" for p in paths}


def test_many_dimension_shape_does_not_hang(tmp_path):
    """A 4 MB header with a 200,000-dimension shape must be refused promptly (element count overflows u64).

    It runs under the same 320 MiB limit: the header and its parsed list fit easily.

    Multiplying the dimensions as unbounded Python ints is quadratic: minutes for this file.
    """
    dims = ",".join([str(2**63)] * 200_000)
    header = '{"a":{"dtype":"U8","shape":[' + dims + ',0],"data_offsets":[0,0]}}'
    path = write(tmp_path, raw_file(header))
    try:
        result = run_probe([path], timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("parsing a 4 MB header with a 200,000-dimension shape took more than 5 s")
    assert result == {str(path): "SurgeryError"}
