import torch

from lowbit_adamw.tinylm import TinyLM, batches, token_splits


def tiny_model(seed=0, dim=32, layers=1, seq_len=32, dtype=torch.float32):
    torch.manual_seed(seed)
    return TinyLM(dim=dim, layers=layers, heads=2, seq_len=seq_len).to(dtype)


def data(seq_len=32, batch=8, seed=0):
    train, _ = token_splits(max_bytes=200_000)
    return batches(train, batch, seq_len, seed)


def train(model, opt, steps, seq_len=32, seed=0):
    it = data(seq_len, seed=seed)
    losses = []
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def backends(cpu=("torch", "compiled")):
    """The backends this machine can run: the CPU ones asked for (the compiled one only with a working
    torch.compile), then Triton (on a GPU, or under the interpreter)."""
    from lowbit_adamw.step import functional as F

    out = [b for b in cpu if b != "compiled" or F.compiled_available()]
    try:
        from lowbit_adamw.step.kernel_launch import triton_available

        if triton_available():
            out.append("triton")
    except Exception:
        pass
    return out


def dequantized(opt, p, name):
    from lowbit_adamw import format as fmt

    s = opt.state[p]
    if name + "_codes" in s:
        group = [g for g in opt.param_groups if any(q is p for q in g["params"])][0]
        return fmt.dequantize_blockwise(s[name + "_codes"], s[name + "_absmax"], fmt.is_signed(name), group["block_size"],
                                        bits=group["bits"], numel=p.numel()).view_as(p)
    return s[name]


# ---- backend against the eager oracle --------------------------------------------------------------
# The three backends follow one spec to the bit (lowbit_adamw.format.step_spec), so on the CPU they agree
# exactly. The comparison below is the principled bound that also holds where a platform's division
# or square root is off by an ulp: a code may differ only where the oracle's pre-rounding companded
# value sits within a few fp32 ulps of a rounding boundary, and then by one; nowhere else.

BOUNDARY_ULPS = 4


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (x in fp32), floored at the smallest normal's spacing."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.float().abs().clamp_min(fi.tiny))
    return torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float32), e - 1)


def oracle_moments(param, grad, state, sc, block_size, grad_mul=1.0, bits=8):
    """The fp32 moments (name -> flat tensor) the eager step encodes, from the state *before* the step
    (state["step"] already incremented), computed on copies with the oracle's own functions."""
    from lowbit_adamw import format as fmt
    from lowbit_adamw.step import functional as F
    from lowbit_adamw.format.step_spec import state_names

    names = state_names(sc.amsgrad)
    values = {n: fmt.dequantize_blockwise(state[n + "_codes"], state[n + "_absmax"], fmt.is_signed(n), block_size, bits=bits,
                                          numel=param.numel()) for n in names}
    p32 = param.detach().reshape(-1).to(torch.float32, copy=True)
    g32 = grad.reshape(-1).to(torch.float32, copy=True)
    step_size, inv_bc2_sqrt = sc.corrections(float(state["step"]))
    F._update_chunk(p32, g32, values["exp_avg"], values["exp_avg_sq"], values.get("max_exp_avg_sq"), sc, step_size, inv_bc2_sqrt, grad_mul)
    return values


def _block_rows(x: torch.Tensor, block_size: int):
    from lowbit_adamw import format as fmt

    n = x.numel()
    pad = torch.zeros(fmt.num_blocks(n, block_size) * block_size, device=x.device)
    pad[:n] = x
    return pad.view(-1, block_size), n


def _block_ratio(x: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
    """x / block absmax (flat, like x), as the encoder computes it."""
    rows, n = _block_rows(x, block_size)
    a = rows.abs().amax(dim=1, keepdim=True) if signed else rows.amax(dim=1, keepdim=True)
    return (rows * torch.where(a > 0, 1.0 / a, torch.zeros_like(a))).reshape(-1)[:n]


def near_boundary(x: torch.Tensor, signed: bool, block_size: int, bits: int = 8, u: float = 0.5) -> torch.Tensor:
    """Where the encoder's decision is within BOUNDARY_ULPS fp32 ulps of flipping (format v4): for m, the
    companded value sqrt(|s|) * 127 (floored after + 0.5) or one of the 4-bit m map's midpoints; for v,
    the test (s - low) > u * (high - low) between the two levels around s, or the choice of those
    levels (a companded value next to an integer). ``u``: v's dither (1/2 without one)."""
    from lowbit_adamw import format as fmt

    s = _block_ratio(x, signed, block_size)
    tol = lambda c: BOUNDARY_ULPS * ulp(c, torch.float32)  # noqa: E731
    if signed and bits == 4:
        bounds = torch.tensor(fmt.M4_BOUNDS)
        return ((s.abs()[:, None] - bounds.abs()).abs() <= tol(bounds)).any(dim=1)
    if signed:
        c = fmt.sqrt_rn(s.abs()) * fmt.M_LEVELS + 0.5
        return (c - c.round()).abs() <= tol(c)
    rows, n = _block_rows(s, block_size)
    if bits == 4:
        c = s * fmt.V4_LEVELS - 1.0
        lo = torch.clamp(torch.floor(c), 0, fmt.V4_LEVELS - 2.0)
        map_b = None
    else:
        map_b = (rows.amin(dim=1, keepdim=True) >= fmt.V_SPLIT).reshape(-1, 1).expand(-1, block_size).reshape(-1)[:n]
        c = torch.where(map_b, s * 510.0 - 255.0, fmt.sqrt_rn(fmt.sqrt_rn(s)) * fmt.V_LEVELS)
        lo = torch.clamp(torch.floor(c), 0, fmt.V_LEVELS - 1.0)
    low, high = fmt.v_level(lo, map_b, bits), fmt.v_level(lo + 1.0, map_b, bits)
    decision = (s - low) - u * (high - low)
    return ((c - c.round()).abs() <= tol(c)) | (decision.abs() <= tol(s))


def m4_bound_probes() -> torch.Tensor:
    """Every midpoint of the 4-bit m map, the floats on either side of it, and every level: where a 4-bit m
    code's search must count exactly as the spec does (random steps rarely land there)."""
    from lowbit_adamw import format as fmt

    bounds = torch.tensor(fmt.M4_BOUNDS)
    return torch.cat([bounds, torch.nextafter(bounds, torch.tensor(-2.0)), torch.nextafter(bounds, torch.tensor(2.0)),
                      torch.tensor(fmt.M4_LEVELS)])


def codes_of(state, name, numel, bits=8):
    """One code per element (4-bit codes unpacked)."""
    from lowbit_adamw import format as fmt

    codes = state[name + "_codes"]
    return codes if bits == 8 else fmt.unpack_nibbles(codes, numel)


def assert_codes_match(oracle_state, other_state, moments, block_size, where="", bits=8):
    """Codes of ``other_state`` equal the oracle's except, by one, where the encoder's input is within
    BOUNDARY_ULPS fp32 ulps of a rounding boundary (``near_boundary``); scales within 2 fp32 ulps."""
    from lowbit_adamw import format as fmt

    for name, x in moments.items():
        a, b = codes_of(oracle_state, name, x.numel(), bits).int(), codes_of(other_state, name, x.numel(), bits).int()
        if bits != 8 and x.numel() % 2:  # the padding nibble after an odd last element is part of the format: 0
            for state in (oracle_state, other_state):
                assert state[name + "_codes"][-1] >> 4 == 0, f"{where}{name}: padding nibble"
        diff = (a - b).abs()
        if diff.any():
            near = near_boundary(x, fmt.is_signed(name), block_size, bits)
            bad = (diff > 1) | ((diff == 1) & ~near)
            assert not bad.any(), f"{where}{name}: {int(bad.sum())} codes differ away from a rounding boundary, e.g. at {bad.nonzero()[:5].flatten().tolist()}"
        sa, sb = oracle_state[name + "_absmax"], other_state[name + "_absmax"]
        assert ((sa - sb).abs() <= 2 * ulp(sa, torch.float32)).all(), f"{where}{name}_absmax"


def assert_params_within_ulp(a: torch.Tensor, b: torch.Tensor, where=""):
    """Every element within one ulp of the parameter dtype."""
    d = (a.float() - b.float()).abs()
    assert (d <= ulp(a.float(), a.dtype)).all(), f"{where}: {int((d > ulp(a.float(), a.dtype)).sum())} elements more than 1 ulp apart"
