"""fairseq's Adam on the CPU through torch's fused kernel (fairseq_s2s_attn/optim.py)."""

import copy

import pytest
import torch
from fairseq.optim.adam import Adam

import fairseq_s2s_attn  # noqa: F401  (installs the replacement)
from fairseq_s2s_attn import optim

fairseqs_step = Adam.step.__wrapped__  # fairseq's own loop


def params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 11), (11,), (5, 3, 4), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32).to(dtype))
            for s in shapes]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def run(step_fn, ps, steps, **options):
    opt = Adam(ps, **options)
    for t in range(steps):
        set_grads(ps, t)
        for group in opt.param_groups:  # a learning-rate schedule
            group["lr"] = options.get("lr", 1e-3) * (1 + t) / steps
        step_fn(opt)
    return opt


@pytest.fixture
def counted(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return torch._fused_adamw_(*args, **kwargs)

    monkeypatch.setattr(optim, "FUSED_ADAMW", counting)
    return calls


@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, lr=0.01),
                                     dict(betas=(0.8, 0.98), eps=1e-6, lr=0.05)])
def test_fused_step_equals_fairseqs_loop(options, counted):
    fused, plain = params(), params()
    a = run(lambda o: o.step(), fused, 25, **options)
    b = run(lambda o: fairseqs_step(o), plain, 25, **options)
    assert counted == [4] * 25  # every step in one call of the kernel, all four parameters
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        sa, sb = a.state[p], b.state[q]
        assert sa["step"] == sb["step"] == 25 and isinstance(sa["step"], int)
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-8)
    assert any(not torch.equal(p, q0) for p, q0 in zip(fused, params()))  # it did train


def test_resume_across_the_two_paths(counted):
    """The state stays fairseq's layout: a checkpoint of fused steps resumes in fairseq's loop
    (and the reverse), with the results of either path alone."""
    ps, ref = params(), params()
    a = run(lambda o: o.step(), ps, 5)
    b = Adam(ref)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for p, q in zip(ps, ref):
        q.data.copy_(p.data)
    set_grads(ps, 7)
    set_grads(ref, 7)
    a.step()
    fairseqs_step(b)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert a.state[ps[0]]["step"] == b.state[ref[0]]["step"] == 6


@pytest.mark.parametrize("case", ["bf16 parameters", "amsgrad", "no gradient"])
def test_other_steps_take_fairseqs_loop(case, counted):
    ps, ref = (params(dtype=torch.bfloat16), params(dtype=torch.bfloat16)) if case == "bf16 parameters" \
        else (params(), params())
    options = dict(amsgrad=True) if case == "amsgrad" else {}
    a, b = Adam(ps, **options), Adam(ref, **options)
    set_grads(ps, 0)
    set_grads(ref, 0)
    if case == "no gradient":  # a parameter without a gradient is left alone, as by fairseq
        ps[1].grad = ref[1].grad = None
    a.step()
    fairseqs_step(b)
    if case == "no gradient":
        assert counted == [3] and ps[1] not in a.state
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    else:
        assert counted == []
        for p, q in zip(ps, ref):
            assert torch.equal(p, q)
