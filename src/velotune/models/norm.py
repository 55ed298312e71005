"""RMSNorm forward on velotune's kernel: Llama style (offset 0), Gemma style (1 + w, offset 1) or OLMo 2
style (w times the fp32 row, one rounding)."""

from __future__ import annotations

from velotune.kernels.rmsnorm import rms_norm
from velotune.models.modes import modes_of


def norm_forward(self, x):
    """Replacement for `<Family>RMSNorm.forward`: x [..., H] -> [..., H], same dtype rules as stock.
    Under a layer's `norm_outputs` mode (models/modes.py) the output is recorded there."""
    spec = self._velotune_spec
    y = rms_norm(
        x,
        self.weight,
        getattr(self, spec.norm_eps_attr),
        offset=spec.norm_offset,
        weight_in_fp32=spec.norm_weight_in_fp32,
    )
    table = modes_of(self).norm_outputs
    if table is not None:
        table[y.untyped_storage().data_ptr()] = (self, x, y)
    return y
