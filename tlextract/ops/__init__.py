"""Pure computation on a loaded model or on tensors: generation (with capture), pooling, vector
methods, metrics, steering, monitoring, vector containers and file formats.

The low-level helpers a notebook may want beside the top level, as ``tx.ops.<name>``: build a
prompt and its ids (``render_prompt``, ``tokenize``), generate a batch with the KV cache
(``generate_batch``, ``decode_session`` for several in a row), pool the residual stream
(``pooled_activations``, ``hook_name``), a steering scale (``residual_norm``) and 95% intervals
(``bootstrap``). Everything else is in the modules of this package.
"""

from tlextract.model.accel import decode_session
from tlextract.model.tokens import tokenize
from tlextract.ops.bootstrap import Interval, bootstrap
from tlextract.ops.generate import Generation, generate_batch
from tlextract.ops.pool import hook_name, pooled_activations
from tlextract.ops.steer import residual_norm
from tlextract.traits import render_prompt

__all__ = [
    "Generation",
    "Interval",
    "bootstrap",
    "decode_session",
    "generate_batch",
    "hook_name",
    "pooled_activations",
    "render_prompt",
    "residual_norm",
    "tokenize",
]
