"""The trainer's fused Adam (sae_kit/train/adam.py): the same update as torch's, without its copy of
a column-major gradient."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sae_kit.train.adam import Adam, contiguous_permutation


def _steps(optimizer_class, amsgrad: bool, steps: int = 3):
    gen = torch.Generator().manual_seed(0)
    encoder = torch.nn.Parameter(torch.randn(48, 16, generator=gen).T.clone())  # column-major, as W_enc
    bias = torch.nn.Parameter(torch.randn(48, generator=gen))
    optimizer = optimizer_class([encoder, bias], lr=0.05, fused=True, amsgrad=amsgrad)
    for _ in range(steps):
        encoder.grad = torch.randn(48, 16, generator=gen).T.clone()
        bias.grad = torch.randn(48, generator=gen)
        optimizer.step()
    return encoder, bias, optimizer


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_update_is_bit_identical_to_torch_fused_adam_and_layouts_are_kept(amsgrad):
    ours_w, ours_b, ours = _steps(Adam, amsgrad)
    theirs_w, theirs_b, theirs = _steps(torch.optim.Adam, amsgrad)
    assert torch.equal(ours_w, theirs_w) and torch.equal(ours_b, theirs_b)
    assert ours_w.stride() == (1, 16)  # the parameter keeps its layout
    state, reference = ours.state_dict()["state"], theirs.state_dict()["state"]
    for name in ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if amsgrad else ()):
        assert torch.equal(state[0][name], reference[0][name])
        assert state[0][name].stride() == reference[0][name].stride()
    # Against the plain (non-fused) update too, up to rounding: the views pair the right elements.
    plain_w, _, _ = _steps(lambda params, **kw: torch.optim.Adam(params, **{**kw, "fused": False}), amsgrad)
    torch.testing.assert_close(ours_w, plain_w, rtol=1e-5, atol=1e-6)


def test_no_copy_of_the_column_major_gradient():
    encoder = torch.nn.Parameter(torch.randn(64, 32).T.clone())
    optimizer = Adam([encoder], lr=0.01, fused=True)
    encoder.grad = torch.randn(64, 32).T.clone()
    optimizer.step()  # the moments are created outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        optimizer.step()
    copies = [e for e in prof.events() if e.name in ("aten::clone", "aten::copy_") and [32, 64] in e.input_shapes]
    assert not copies, [(e.name, e.input_shapes) for e in copies]
    # torch's own fused Adam does copy it (the reason for the subclass): if torch stops, drop ours.
    reference = torch.optim.Adam([encoder], lr=0.01, fused=True)
    reference.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        reference.step()
    assert any(e.name == "aten::copy_" and [32, 64] in e.input_shapes for e in prof.events())


def test_contiguous_permutation():
    assert contiguous_permutation(torch.zeros(3, 4)) is None
    assert contiguous_permutation(torch.zeros(3, 4).T) == [1, 0]
    assert contiguous_permutation(torch.zeros(2, 3, 4).permute(2, 0, 1)) == [1, 2, 0]
    assert contiguous_permutation(torch.zeros(6, 4)[::2]) is None  # not dense: left to the kernel
