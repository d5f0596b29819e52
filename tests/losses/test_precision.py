"""Every baseline loss under bf16: computed in float32, the teacher a constant."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.losses import (cc_loss, crd_nce_loss, dist_loss, dkd_loss, ft_loss, ft_reconstruction_loss,
                                 hcl_loss, nst_loss, ofd_partial_l2, pkt_loss, sp_loss, standardized_kd_loss,
                                 vid_loss)


# ---- all losses: teacher constant, bf16 autocast safe ---------------------------------------
def _cases():
    torch.manual_seed(5)
    logits_s, logits_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    emb_s, emb_t = torch.randn(4, 6), torch.randn(4, 3)
    map_s, map_t = torch.randn(4, 3, 4, 4), torch.randn(4, 2, 4, 4)
    return {
        "sp": (lambda s, t: sp_loss(s, t), map_s, map_t),
        "pkt": (lambda s, t: pkt_loss(s, t), emb_s, emb_t),
        "nst": (lambda s, t: nst_loss(s, t), map_s, map_t),
        "cc": (lambda s, t: cc_loss(s, t), emb_s, emb_t),
        "dkd": (lambda s, t: dkd_loss(s, t, y), logits_s, logits_t),
        "dist": (lambda s, t: dist_loss(s, t, temperature=4.0), logits_s, logits_t),
        "ls_kd": (lambda s, t: standardized_kd_loss(s, t), logits_s, logits_t),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_teacher_is_a_constant_and_bf16_autocast_computes_in_float32(name):
    fn, s, t = _cases()[name]
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    fn(s, t).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    ref = fn(s.detach().bfloat16().float(), t.detach().bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(s.detach().bfloat16(), t.detach().bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


# =============================================================================================
# bf16-mixed safety
# =============================================================================================
def test_losses_compute_in_float32_from_bfloat16_inputs():
    bf = torch.bfloat16
    s, t = randn(2, 3, 4, 4, seed=1).to(bf), randn(2, 3, 4, 4, seed=2).to(bf)
    values = [
        vid_loss(s, torch.ones(3), t),
        ft_loss(s, t),
        ft_reconstruction_loss(s, t),
        ofd_partial_l2(s, t, torch.full((3,), -0.5)),
        hcl_loss([s], [t]),
        crd_nce_loss(randn(2, 5).to(bf), 1.0, 10),
    ]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values)
