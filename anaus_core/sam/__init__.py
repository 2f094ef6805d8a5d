"""Building SAM from the ``segment_anything`` package's own modules (no vendored SAM code).

``build_sam(spec, checkpoint=..., image_size=...)`` builds ``segment_anything.modeling.Sam``
for a named architecture (``SAM_SPECS``: vit_b, vit_l, vit_h and a CPU-sized ``tiny``), loads an
official-format checkpoint (a plain ``state_dict`` such as ``sam_vit_b_01ec64.pth``) and, for a
reduced encoder input size, interpolates the absolute and relative position embeddings.
"""

from anaus_core.sam.build import build_sam, load_sam_state_dict, save_random_sam_checkpoint
from anaus_core.sam.checkpoint import file_sha256, read_sam_state_dict
from anaus_core.sam.fast import ATTENTION_KINDS, decode_single_masks, set_attention
from anaus_core.sam.resize import resize_sam_state_dict
from anaus_core.sam.spec import SAM_SPECS, SamSpec, resolve_spec, spec_from_state_dict

__all__ = [
    "ATTENTION_KINDS",
    "decode_single_masks",
    "set_attention",
    "SAM_SPECS",
    "SamSpec",
    "build_sam",
    "file_sha256",
    "load_sam_state_dict",
    "read_sam_state_dict",
    "resize_sam_state_dict",
    "resolve_spec",
    "save_random_sam_checkpoint",
    "spec_from_state_dict",
]
