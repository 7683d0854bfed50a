import pytest
import torch

from lowbit_adamw import format as fmt


def heavy_tailed(n):
    return torch.randn(n) * torch.rand(n) ** 6  # values spanning many decades, like Adam moments


@pytest.mark.parametrize("block", [64, 256, 4096])
@pytest.mark.parametrize("n", [1, 63, 1000, 4097])
def test_round_trip_error_is_within_half_a_level(block, n):
    x = heavy_tailed(n)
    for signed, y in ((True, x), (False, x * x)):
        codes, absmax = fmt.quantize_blockwise(y, signed, block)
        assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
        assert codes.shape == (n,) and absmax.shape == (fmt.num_blocks(n, block),)
        d = fmt.dequantize_blockwise(codes, absmax, signed, block)
        a = absmax.repeat_interleave(block)[:n]
        if signed:  # in the companded domain every value is within half a level (+ float slack) of its code
            err = (d.abs() / a).sqrt() - (y.abs() / a).sqrt()
            assert err.abs().max() <= 0.5 / fmt.M_LEVELS + 1e-6
        else:
            # v rounds to one of the two levels around it. Map A (positive scale): within one level in the
            # companded domain (the zero-point guard may lift a value below the first level up to it);
            # map B (negative scale): within 1/510.
            map_b = a < 0
            a = a.abs()
            err_a = (d / a).sqrt().sqrt() - (y / a).sqrt().sqrt()
            assert (err_a[~map_b].abs() <= 1.0 / fmt.V_LEVELS + 1e-6).all()
            assert (((d - y) / a)[map_b].abs() <= 1.0 / 510 + 1e-6).all()
            assert (y[map_b] >= 0.5 * a[map_b]).all()


def test_codes_are_nearest_level_in_companded_domain():
    x = torch.linspace(-1, 1, 5001)
    codes, absmax = fmt.quantize_blockwise(x, True, 64)
    a = absmax.repeat_interleave(64)[: x.numel()]
    comp = torch.sign(x / a) * (x / a).abs().sqrt()
    table = torch.sign(fmt.M_CODE_MAP) * fmt.M_CODE_MAP.abs().sqrt()
    dist = (comp[:, None] - table[None, :255]).abs()  # small n: brute force is fine in a test
    best = dist.min(dim=1).values
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= best + 1e-6)


def test_sign_never_flips_and_zero_maps_to_zero_code():
    x = heavy_tailed(10_000)
    x[::7] = 0
    codes, absmax = fmt.quantize_blockwise(x, True, 256)
    d = fmt.dequantize_blockwise(codes, absmax, True, 256)
    assert not torch.any(torch.sign(d) * torch.sign(x) < 0)
    assert torch.all(codes[x == 0] == fmt.M_ZERO_CODE)


def test_zero_point_guard_positive_v_never_decodes_to_zero():
    v = torch.zeros(1024)
    v[0] = 1.0  # one large value per block makes the others tiny relative to absmax
    v[1:512] = 1e-30
    v[512] = 1.0
    codes, absmax = fmt.quantize_blockwise(v, False, 256)
    d = fmt.dequantize_blockwise(codes, absmax, False, 256)
    assert torch.all(d[v > 0] > 0)
    assert torch.all(d[v == 0] == 0)


def test_all_zero_block_and_empty_tensor():
    codes, absmax = fmt.quantize_blockwise(torch.zeros(300), True, 256)
    assert torch.all(codes == fmt.M_ZERO_CODE) and torch.all(absmax == 0)
    assert torch.all(fmt.dequantize_blockwise(codes, absmax, True, 256) == 0)
    codes, absmax = fmt.quantize_blockwise(torch.zeros(0), False, 256)
    assert codes.numel() == 0 and absmax.numel() == 0


def test_chunked_path_matches_unchunked_across_chunk_boundaries():
    n = fmt.CHUNK_ELEMENTS + 77
    x = heavy_tailed(n)
    codes, absmax = fmt.quantize_blockwise(x, True, 256)
    # encode the whole tensor as one span (no chunking) and compare
    c2 = torch.empty_like(codes)
    a2 = torch.empty_like(absmax)
    fmt.encode_span(x.clone(), True, 256, c2, a2)
    assert torch.equal(codes, c2) and torch.equal(absmax, a2)


def test_maps_are_monotonic_and_cover_the_range():
    assert torch.all(fmt.M_CODE_MAP[1:255] > fmt.M_CODE_MAP[:254])
    assert fmt.M_CODE_MAP[0] == -1 and fmt.M_CODE_MAP[254] == 1 and fmt.M_CODE_MAP[fmt.M_ZERO_CODE] == 0
    assert torch.all(fmt.V_CODE_MAP[1:] > fmt.V_CODE_MAP[:-1])
    assert fmt.V_CODE_MAP[0] == 0 and fmt.V_CODE_MAP[255] == 1


@pytest.mark.parametrize("bad", [32, 100, 8192, 256.0, True])
def test_bad_block_size_is_refused(bad):
    with pytest.raises(ValueError, match="block_size"):
        fmt.check_block_size(bad)


def test_backend_comparison_allows_a_code_apart_only_at_a_rounding_boundary():
    # the comparison the backend tests use (tests/helpers.py) must be able to fail
    from helpers import assert_codes_match

    block = 64
    x = torch.randn(300) * 0.1
    codes, absmax = fmt.quantize_blockwise(x, True, block)
    oracle = {"exp_avg_codes": codes, "exp_avg_absmax": absmax}
    assert_codes_match(oracle, {"exp_avg_codes": codes.clone(), "exp_avg_absmax": absmax.clone()}, {"exp_avg": x}, block)
    c = (x.abs() / absmax.repeat_interleave(block)[:300]).sqrt() * 127
    far = int(((c - c.floor()) - 0.5).abs().argmax())  # the element farthest from its boundary
    other = codes.clone()
    other[far] += 1 if other[far] < 254 else -1
    with pytest.raises(AssertionError, match="away from a rounding boundary"):
        assert_codes_match(oracle, {"exp_avg_codes": other, "exp_avg_absmax": absmax}, {"exp_avg": x}, block)
    # an element placed exactly on a boundary may round either way
    y = x.clone()
    y[0] = absmax[0]  # the block's scale stays absmax[0]
    y[5] = absmax[0] * (10.5 / 127) ** 2  # sqrt(y / absmax) * 127 = 10.5: on the boundary between q = 10 and 11
    cy, ay = fmt.quantize_blockwise(y, True, block)
    q = int(cy[5]) - fmt.M_ZERO_CODE
    assert q in (10, 11)
    flipped = cy.clone()
    flipped[5] = fmt.M_ZERO_CODE + (21 - q)
    assert_codes_match({"exp_avg_codes": cy, "exp_avg_absmax": ay}, {"exp_avg_codes": flipped, "exp_avg_absmax": ay}, {"exp_avg": y}, block)
