"""Dropout with 16-bit masks (fairseq_s2s_attn/dropout.py): the probability, the scale, the
gradient, reproducibility, and where torch's own dropout still runs."""

import pytest
import torch
import torch.nn.functional as F

from fairseq_s2s_attn import dropout as D
from fairseq_s2s_attn import native

from conftest import build_model


def test_effective_p_is_within_2_to_the_minus_17():
    for p in (0.0, 0.1, 0.2, 0.3, 1 / 3, 0.5, 0.9):
        assert abs(D.effective_p(p) - p) <= 2 ** -17
    assert D.effective_p(0.1) == 6554 / 65536


@pytest.mark.parametrize("source", ["eager", "c_loop"])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_masks_drop_with_probability_p_in_every_lane(p, source):
    """Four elements share a 64-bit draw: each of the four 16-bit lanes must be random. With the
    sign bit of the draw left at 0 (``random_()``), one lane in four is never below the
    threshold's negative values and drops at a very different rate. The same for the C loop's
    masks (native.dropout: the lanes of a SplitMix64 word per four elements), read from the
    kept elements of dropout applied to ones."""
    torch.manual_seed(0)
    n = 1 << 22
    if source == "eager":
        keep = D.keep_mask(torch.Size([n]), p, torch.device("cpu"))
        assert keep.dtype == torch.bool and keep.shape == (n,)
    else:
        if native.library() is None:
            pytest.skip("the C loops are not built here")
        keep = D.cpu_dropout(torch.ones(n), p) != 0
    sd = (p * (1 - p) / (n / 4)) ** 0.5
    for lane in range(4):
        rate = 1 - keep[lane::4].float().mean().item()
        assert abs(rate - D.effective_p(p)) < 6 * sd, (lane, rate)
    # neighbours are independent: P(both dropped) = p^2
    both = (~keep[:-1] & ~keep[1:]).float().mean().item()
    assert abs(both - D.effective_p(p) ** 2) < 6 * (p * p / n) ** 0.5 + 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_is_x_scaled_or_zero_and_gradient_follows_the_mask(dtype):
    torch.manual_seed(1)
    p = 0.3
    x = (torch.rand(37, 5, 16) + 0.5).to(dtype).requires_grad_()
    y = D.cpu_dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    scale = 1 / (1 - D.effective_p(p))
    assert 0 < kept.float().mean().item() < 1
    assert torch.equal(y[kept], (x.detach()[kept] * scale).to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, (g * kept * scale).to(dtype))
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))


def test_expectation_is_x():
    torch.manual_seed(2)
    x = torch.full((1 << 20,), 3.0)
    assert abs(D.cpu_dropout(x, 0.1).mean().item() - 3.0) < 6 * 3 * (0.1 / 0.9 / (1 << 20)) ** 0.5


def test_masks_follow_the_default_generator_seed():
    x = torch.ones(1000)
    torch.manual_seed(5)
    a, b = D.cpu_dropout(x, 0.2), D.cpu_dropout(x, 0.2)
    torch.manual_seed(5)
    assert torch.equal(D.cpu_dropout(x, 0.2), a)
    assert not torch.equal(a, b)


def test_non_contiguous_input():
    torch.manual_seed(3)
    x = torch.rand(8, 16, 4).transpose(0, 1) + 1  # 16 x 8 x 4, not contiguous
    y = D.cpu_dropout(x, 0.5)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * 2)


def test_module_like_fairseqs_when_torch_dropout_runs():
    x = torch.rand(64, 32) + 1
    m = D.Dropout(0.25)
    m.eval()
    assert m(x) is x  # not in training
    m.apply_during_inference = True  # --retain-dropout
    torch.manual_seed(4)
    y = m(x)
    assert ((y == 0) | (y == x * (1 / (1 - D.effective_p(0.25))))).all() and (y == 0).any()
    m.train()
    assert D.Dropout(0.0).train()(x) is x
    assert torch.equal(D.Dropout(1.0).train()(x), torch.zeros_like(x))  # F.dropout: all dropped
    # in place: torch's dropout, as FairseqDropout
    torch.manual_seed(6)
    expected = F.dropout(x.clone(), 0.25, True)
    torch.manual_seed(6)
    z = x.clone()
    m(z, inplace=True)
    assert torch.equal(z, expected)


def test_every_dropout_site_of_the_model_uses_it():
    model = build_model("rnn_luong", dropout=True)
    from fairseq.modules import FairseqDropout

    sites = [m for m in model.modules() if isinstance(m, FairseqDropout)]
    assert sites and all(isinstance(m, D.Dropout) for m in sites)
