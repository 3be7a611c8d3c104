"""Fused Adam that hands the kernel each tensor in its own memory order.

The encoder W_enc [d_in, d_sae] is column-major (its storage is the [d_sae, d_in] decoder-major
layout of the tied init, which the sparse kernels read row by row). torch's fused CPU kernel walks
parameter, gradient and moments by one flat index, which is right when all four share a layout,
but it first runs ``grad.contiguous()`` and then never uses the result: for a column-major gradient
that is a transposing copy of the whole [d_in, d_sae] matrix every step (~50 ms at 16384 x 768 on
one core, more than the update itself). Handing the kernel the permuted views that are contiguous
(``W_enc.T`` and its gradient's and moments' transposes: the same memory) skips that copy; the
update is the same kernel over the same elements in the same order, so it is bit-identical.
"""
from __future__ import annotations

import torch


def contiguous_permutation(tensor: torch.Tensor) -> list[int] | None:
    """The dimension order in which ``tensor`` is contiguous (None if it is already, or in none)."""
    if tensor.is_contiguous():
        return None
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
    return order if tensor.permute(order).is_contiguous() else None


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose fused kernel sees non-contiguous tensors as contiguous views.

    Only the lists handed to the kernel change: the optimizer's state, its ``state_dict`` and the
    parameters keep their shapes and layouts (checkpoints are unchanged).
    """

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        start = len(params_with_grad)
        has_complex = super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          state_steps)
        if not group["fused"]:
            return has_complex
        lists = [params_with_grad, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
        for i in range(start, len(params_with_grad)):
            param = params_with_grad[i]
            order = contiguous_permutation(param)
            # Only when all share the parameter's layout (_match_state_layout sees to the moments).
            if order is None or any(lst[i].stride() != param.stride() for lst in lists):
                continue
            for lst in lists:
                lst[i] = lst[i].permute(order)
        return has_complex
