"""What one attention call asks for, unpacked once from the ops' flat schema.

The ``torch.library`` ops keep a flat argument list (it must stay traceable); `ops` turns it into
an `AttentionOptions` (what to compute) and an `AttentionLayout` (how the batch is laid out) and
hands both to a backend as ``forward(q, k, v, layout, options)``. A new option is a field here,
one schema argument in `ops` and whatever the backends do with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class AttentionOptions:
    """Validated options (see `functional`): window ``(left, right)`` with -1 = unbounded, softcap 0 = off."""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    softmax_scale: float = 1.0
    deterministic: bool = False

    @property
    def key_window(self) -> tuple[int, int]:
        """(left, right) keys each query sees around its aligned position: causal is a right window of 0."""
        return self.window[0], 0 if self.causal else self.window[1]

    def schema_args(self) -> tuple[bool, int, int, float, float, bool]:
        """The options as the ops' flat schema arguments (causal ... deterministic), see `from_schema`."""
        return self.causal, self.window[0], self.window[1], self.softcap, self.softmax_scale, self.deterministic

    @classmethod
    def from_schema(
        cls,
        causal: bool,
        window_left: int,
        window_right: int,
        softcap: float,
        softmax_scale: float,
        deterministic: bool,
    ) -> AttentionOptions:
        return cls(causal, (window_left, window_right), softcap, softmax_scale, deterministic)


@dataclass(frozen=True)
class AttentionLayout:
    """Padded (key_mask optional) or packed (cu_seqlens offsets) batch layout.

    ``key_mask_state`` is what the chosen backend derives from the mask (see `key_masks`), once per mask.
    """

    key_mask: Tensor | None
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    key_mask_state: Any = None

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens_q is not None

    def lse_shape(self, q: Tensor) -> tuple[int, ...]:
        """The log-sum-exp's shape: (B, Hq, Sq) padded, (Hq, Tq) packed."""
        return (q.shape[1], q.shape[0]) if self.is_packed else (q.shape[0], q.shape[2], q.shape[1])
