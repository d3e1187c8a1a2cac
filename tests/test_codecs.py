import numpy as np
import pytest
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_runtime.codecs import FEATURE_CODECS, decode_exact, encode_exact, get_codec
from edge_runtime.errors import WireError


def relu_maps(n=4, c=16, s=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, c, s, s)).astype(np.float32)
    return np.maximum(x, 0)  # post-ReLU: about half zeros


@pytest.mark.parametrize("name", FEATURE_CODECS)
def test_round_trip_within_the_codec_bound(name):
    x = relu_maps()
    codec = get_codec(name)
    y = codec.decode(codec.encode(x), x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y - x).reshape(x.shape[0] * x.shape[1], -1).max(axis=1)
    assert (err <= codec.max_error(x) * 1.0001 + 1e-7).all()
    assert (y[x == 0] == 0).all()  # zeros stay exactly zero


def test_fp32_is_exact_and_quantizers_shrink():
    x = relu_maps(n=64)
    sizes = {n: len(get_codec(n).encode(x)) for n in FEATURE_CODECS}
    assert np.array_equal(get_codec("fp32").decode(get_codec("fp32").encode(x), x.shape), x)
    assert sizes["fp32"] > sizes["fp16"] > sizes["q8"] > sizes["q4"]
    assert sizes["q4"] < x.nbytes / 6


def test_all_zero_plane_and_negative_inputs():
    x = relu_maps()
    x[1, 3] = 0
    x[2, 5, 0, 0] = -1.0  # not post-ReLU: clamped to zero by the quantizers
    for name in ("q8", "q4"):
        y = get_codec(name).decode(get_codec(name).encode(x), x.shape)
        assert (y[1, 3] == 0).all() and y[2, 5, 0, 0] == 0


@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5),
                                    st.integers(1, 5)),
              elements=st.floats(0, 1e4, width=32)))
@settings(max_examples=60, deadline=None)
def test_quantizers_respect_their_bound_on_any_input(x):
    for name in ("fp16", "q8", "q4"):
        codec = get_codec(name)
        y = codec.decode(codec.encode(x), x.shape)
        err = np.abs(y - x).reshape(x.shape[0] * x.shape[1], -1).max(axis=1)
        assert (err <= codec.max_error(x) * 1.001 + 1e-6).all()


def test_exact_round_trip():
    for arr in (np.arange(10, dtype=np.int64), np.random.rand(3, 4).astype(np.float32)):
        assert np.array_equal(decode_exact(encode_exact(arr), str(arr.dtype), arr.shape), arr)


def test_decoder_refuses_a_zip_bomb():
    bomb = zstd.ZstdCompressor().compress(b"\0" * 50_000_000)
    with pytest.raises(WireError) as err:
        get_codec("fp32").decode(bomb, (1, 16, 8, 8))
    assert err.value.reason == "shape"


def test_decoder_refuses_truncated_and_garbage_blobs():
    x = relu_maps()
    blob = get_codec("q8").encode(x)
    with pytest.raises(WireError):
        get_codec("q8").decode(blob[: len(blob) // 2], x.shape)
    with pytest.raises(WireError) as err:
        get_codec("q8").decode(b"not zstd at all", x.shape)
    assert err.value.reason == "corrupt"
    with pytest.raises(WireError) as err:
        decode_exact(encode_exact(np.arange(3)), "object", (3,))
    assert err.value.reason == "dtype"


def test_unknown_codec_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown codec 'q3'.*q4"):
        get_codec("q3")
