"""RMSNorm forward on velotune's kernel: Llama style (offset 0) or Gemma style (1 + w, offset 1)."""
from __future__ import annotations


def norm_forward(self, x):
    """Replacement for `<Family>RMSNorm.forward`: x [..., H] -> [..., H], same dtype rules as stock."""
    from velotune.kernels.rmsnorm import rms_norm

    spec = self._velotune_spec
    return rms_norm(x, self.weight, getattr(self, spec.norm_eps_attr), offset=spec.norm_offset)
