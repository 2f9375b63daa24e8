"""A sequence's text with each token coloured by its top-1 expert at one layer, as escaped HTML.

Hovering a token (the ``title`` attribute) shows its top-k experts and weights; with a compared run, tokens whose
top-k set differs are outlined and their title shows both runs' choices. Token texts come from the store and are
escaped, so a token like ``<script>`` is shown, never run.
"""
from __future__ import annotations

import html

import numpy as np

from .figures import expert_color

CSS = ("<style>.rl-seq{line-height:2.1;font-family:ui-monospace,monospace;font-size:0.95rem;white-space:pre-wrap}"
       ".rl-tok{border-radius:3px;padding:1px 0;margin:0 1px}.rl-diff{outline:2px solid #d62728;outline-offset:1px}"
       ".rl-gen{text-decoration:underline dotted}</style>")


def _picks(experts: np.ndarray, weights: np.ndarray) -> str:
    return ", ".join(f"e{int(e)} {float(w):.3f}" for e, w in zip(experts, weights) if e >= 0)


def topk_changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[..., k]`` expert arrays -> bool ``[...]``: the two top-k *sets* differ (rank order ignored)."""
    return np.any(np.sort(a, axis=-1) != np.sort(b, axis=-1), axis=-1)


def sequence_html(tokens: list[str], experts: np.ndarray, weights: np.ndarray, *, layer: int,
                  generated: list[bool] | None = None, other: np.ndarray | None = None,
                  other_weights: np.ndarray | None = None, other_label: str = "other run") -> str:
    """HTML for one layer: ``experts[t, k]`` / ``weights[t, k]`` per token t; ``other[t, k]`` marks differences."""
    out = [CSS, '<div class="rl-seq">']
    for t, text in enumerate(tokens):
        e = experts[t]
        title = f"pos {t} · layer {layer}: {_picks(e, weights[t]) or 'not routed'}"
        classes = ["rl-tok"]
        if other is not None and t < len(other):
            if topk_changed(e, other[t]):
                classes.append("rl-diff")
                ow = other_weights[t] if other_weights is not None else np.zeros(len(other[t]))
                title += f"\n{other_label}: {_picks(other[t], ow)}"
        if generated is not None and generated[t]:
            classes.append("rl-gen")
            title += "\n(generated)"
        color = expert_color(int(e[0]), 0.85) if e[0] >= 0 else "transparent"
        shown = text.replace("\n", "⏎\n") if text else "∅"
        out.append(f'<span class="{" ".join(classes)}" style="background:{color}" '
                   f'title="{html.escape(title, quote=True)}">{html.escape(shown)}</span>')
    out.append("</div>")
    return "".join(out)


def legend_html(experts: list[int]) -> str:
    chips = "".join(f'<span class="rl-tok" style="background:{expert_color(e, 0.85)}">&nbsp;e{e}&nbsp;</span> '
                    for e in experts)
    return CSS + f'<div class="rl-seq">top-1 expert: {chips}</div>'
