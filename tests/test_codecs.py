import numpy as np
import pytest
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge_runtime.protocol.codecs import (
    ARRAY_DTYPES,
    FEATURE_CODECS,
    decode_array,
    encode_array,
    get_codec,
)
from edge_runtime.protocol.errors import WireError

LEVELS = {"q8": 255, "q4": 15}


def relu_maps(n=4, c=16, s=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, c, s, s)).astype(np.float32)
    return np.maximum(x, 0)  # post-ReLU: about half zeros


def round_trip(name, x):
    codec = get_codec(name)
    y = codec.decode(codec.encode(x), x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    return y


def plane_error(x, y):
    return np.abs(y.astype(np.float64) - x).reshape(x.shape[0] * x.shape[1], -1).max(axis=1)


def test_fp32_is_bit_exact():
    x = relu_maps()
    assert np.array_equal(round_trip("fp32", x), x)


def test_fp16_is_within_half_an_ulp():
    x = relu_maps()
    err = np.abs(round_trip("fp16", x) - x)
    assert (err <= np.abs(x) * 2.0**-11 + 2.0**-25).all()
    assert err.max() > 0  # it is lossy: the bound is what is being checked


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_quantizer_error_is_at_most_half_a_step_per_channel(name):
    x = relu_maps(n=8) * 3
    err = plane_error(x, round_trip(name, x))
    scale = x.reshape(8 * 16, -1).max(axis=1) / LEVELS[name]
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    assert err.max() > scale.max() / 10  # and it does use most of that budget


@pytest.mark.parametrize("name", FEATURE_CODECS)
def test_zeros_and_all_zero_channels_stay_exactly_zero(name):
    x = relu_maps()
    x[1, 3] = 0
    y = round_trip(name, x)
    assert (y[x == 0] == 0).all() and (y[1, 3] == 0).all()
    z = np.zeros((2, 16, 4, 4), np.float32)
    assert (round_trip(name, z) == 0).all()


def test_quantizers_clamp_negatives_and_fp_codecs_keep_them():
    x = relu_maps()
    x[2, 5, 0, 0] = -1.0
    for name in ("q8", "q4"):
        assert round_trip(name, x)[2, 5, 0, 0] == 0
    assert round_trip("fp32", x)[2, 5, 0, 0] == -1.0
    assert round_trip("fp16", x)[2, 5, 0, 0] == -1.0


@pytest.mark.parametrize("name", FEATURE_CODECS)
def test_encoders_refuse_nan_and_inf(name):
    x = relu_maps()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(WireError) as err:
        get_codec(name).encode(x)
    assert err.value.reason == "nonfinite"


def test_fp16_refuses_values_it_would_turn_into_inf():
    with pytest.raises(WireError, match="65504"):
        get_codec("fp16").encode(np.full((1, 1, 2, 2), 1e5, np.float32))


def test_odd_sizes_and_empty_batches():
    x = relu_maps(n=3, c=5, s=3)  # 135 elements: q4 pads the last byte
    for name in FEATURE_CODECS:
        assert np.abs(round_trip(name, x) - x).max() <= x.max() / 15
        assert round_trip(name, np.zeros((0, 16, 8, 8), np.float32)).shape == (0, 16, 8, 8)


def test_smaller_codecs_make_smaller_blobs():
    x = relu_maps(n=64)
    sizes = {n: len(get_codec(n).encode(x)) for n in FEATURE_CODECS}
    assert sizes["fp32"] > sizes["fp16"] > sizes["q8"] > sizes["q4"]
    assert sizes["q4"] < x.nbytes / 6
    assert len(get_codec("q8", level=19).encode(x)) <= sizes["q8"]


@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(0, 5),
                                    st.integers(1, 5)),
              elements=st.floats(0, 1e4, width=32)))
@settings(max_examples=80, deadline=None)
def test_every_codec_respects_its_bound_on_any_input(x):
    for name in FEATURE_CODECS:
        codec = get_codec(name)
        y = codec.decode(codec.encode(x), x.shape)
        assert (plane_error(x, y) <= codec.error_bound(x)).all() if x.size else y.size == 0
        assert (y[x == 0] == 0).all()


@pytest.mark.parametrize("dtype", ARRAY_DTYPES)
def test_arrays_round_trip_bit_for_bit(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) * 3 - 7).astype(dtype)
    out = decode_array(encode_array(arr), dtype, arr.shape)
    assert out.dtype == arr.dtype and np.array_equal(out, arr)
    out[0] = 0  # decoded arrays are writable (torch.from_numpy needs that)


def test_arrays_are_little_endian_on_the_wire():
    big = np.arange(5, dtype=">i8")
    assert np.array_equal(decode_array(encode_array(big), "int64", (5,)), big)
    assert encode_array(big) == encode_array(big.astype("<i8"))


def test_array_codec_refuses_unknown_dtypes_and_nonfinite_floats():
    for bad in (np.array(["a"]), np.array([1 + 2j]), np.array([object()])):
        with pytest.raises(WireError) as err:
            encode_array(bad)
        assert err.value.reason == "dtype"
    with pytest.raises(WireError) as err:
        decode_array(encode_array(np.arange(3)), "object", (3,))
    assert err.value.reason == "dtype"
    with pytest.raises(WireError) as err:
        encode_array(np.array([1.0, np.inf]))
    assert err.value.reason == "nonfinite"
    inf_blob = zstd.ZstdCompressor().compress(np.array([np.inf], "<f4").tobytes())
    with pytest.raises(WireError) as err:
        decode_array(inf_blob, "float32", (1,))
    assert err.value.reason == "nonfinite"


def test_decoders_refuse_a_zip_bomb_before_decompressing():
    bomb = zstd.ZstdCompressor().compress(b"\0" * 50_000_000)
    with pytest.raises(WireError) as err:
        get_codec("fp32").decode(bomb, (1, 16, 8, 8))
    assert err.value.reason == "too_large"
    # A frame that hides its size is refused too, rather than decompressed to find out.
    stream = zstd.ZstdCompressor(write_content_size=False).compressobj()
    hidden = stream.compress(b"\0" * 50_000_000) + stream.flush()
    with pytest.raises(WireError) as err:
        decode_array(hidden, "float32", (16,))
    assert err.value.reason == "corrupt"


@pytest.mark.parametrize("name", FEATURE_CODECS)
def test_decoders_check_every_size(name):
    x = relu_maps()
    codec = get_codec(name)
    blob = codec.encode(x)
    cases = {
        "oversized": (blob, (3, 16, 8, 8)),  # the blob holds more than the shape
        "undersized": (blob, (5, 16, 8, 8)),  # the shape needs more than the blob holds
        "cut": (blob[: len(blob) // 2], x.shape),
        "extra": (blob + b"\0\0\0\0", x.shape),
        "second_frame": (blob + blob, x.shape),
        "garbage": (b"not zstd at all", x.shape),
        "empty": (b"", x.shape),
    }
    reasons = {}
    for case, (b, shape) in cases.items():
        with pytest.raises(WireError) as err:
            codec.decode(b, shape)
        reasons[case] = err.value.reason
    assert reasons["oversized"] == "too_large" and reasons["undersized"] == "truncated"
    assert {reasons[c] for c in ("cut", "extra", "second_frame", "garbage", "empty")} == {
        "corrupt"}


def test_quantizer_refuses_nonfinite_scales():
    raw = np.array([np.inf], "<f4").tobytes() + bytes(4)
    with pytest.raises(WireError) as err:
        get_codec("q8").decode(zstd.ZstdCompressor().compress(raw), (1, 1, 2, 2))
    assert err.value.reason == "nonfinite"


def test_decoders_refuse_negative_shapes():
    with pytest.raises(WireError) as err:
        get_codec("q8").decode(get_codec("q8").encode(relu_maps()), (-4, 16, 8, 8))
    assert err.value.reason == "shape"


def test_unknown_codec_and_level_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown codec 'q3'; choose from fp32, fp16, q8, q4"):
        get_codec("q3")
    with pytest.raises(ValueError, match="zstd level"):
        get_codec("q8", level=0)


def test_s8_keeps_signs_within_half_a_step_and_refuses_code_minus_128():
    import zstandard

    from edge_runtime.protocol.codecs import decode_delta, encode_delta

    g = np.random.default_rng(0)
    c = get_codec("s8")
    for x in (g.normal(size=(3, 16, 4, 4)).astype(np.float32),  # residuals: per plane
              g.normal(size=(5, 10)).astype(np.float32) * 8):  # logits: per sample
        y = c.decode(c.encode(x), x.shape)
        bound = c.error_bound(x)
        planes = len(bound)
        err = np.abs(y - x).reshape(planes, -1).max(axis=1)
        assert (err <= bound).all() and (np.sign(y) * np.sign(x) >= 0).all()
    raw = np.zeros(1, "<f4").tobytes() + np.array([-128, 0, 0, 0], np.int8).tobytes()
    with pytest.raises(WireError, match="-128"):
        c.decode(zstandard.ZstdCompressor(write_content_size=True).compress(raw), (1, 4))
    ids = np.array([3, 7, 8, 100, 2**40], np.int64)
    assert (decode_delta(encode_delta(ids), ids.shape) == ids).all()
    assert len(encode_delta(np.arange(0, 5000, dtype=np.int64))) < 100  # sorted ids: tiny
    with pytest.raises(WireError, match="int64"):
        encode_delta(ids.astype(np.int32))


def test_partial_feature_chunks_need_a_base_and_increasing_rows():
    import torch

    from edge_runtime.learning.train import FeatureBatch
    from edge_runtime.protocol import wire
    from edge_runtime.protocol.messages import feature_chunk, parse_feature_chunk

    b = FeatureBatch(torch.arange(4), torch.rand(2, 16, 4, 4), torch.randn(4, 10),
                     torch.zeros(4, dtype=torch.int64))
    with pytest.raises(WireError, match="base"):
        feature_chunk("d", 0, "m", 0, 1, b, "q8", rows=np.array([0, 2]))
    with pytest.raises(WireError, match="increase"):
        feature_chunk("d", 0, "m", 0, 1, b, "q8", rows=np.array([2, 0]), base="e1")
    with pytest.raises(WireError, match="base"):  # residuals build on the hub's copy too
        feature_chunk("d", 0, "m", 0, 1, FeatureBatch(b.ids, torch.rand(4, 16, 4, 4),
                                                      b.logits, b.labels), "s8")
    msg = wire.decode_message(feature_chunk("d", 0, "m", 0, 1, b, "q8", rows=np.array([1, 3]),
                                            base="e1"), max_bytes=1 << 20)
    c = parse_feature_chunk(msg)
    assert c.base == "e1" and list(c.rows) == [1, 3] and not c.complete and not c.residual
