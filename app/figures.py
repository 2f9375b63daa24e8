"""Plotly figures of the dashboard: pure functions from small frames/arrays to ``go.Figure``."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import polars as pl

_LAYOUT = dict(margin=dict(l=60, r=20, t=50, b=50), template="plotly_white")


def expert_color(e: int, alpha: float = 1.0) -> str:
    """A stable, readable colour per expert id: hues spread by the golden angle, so neighbours differ."""
    hue = (int(e) * 137.508) % 360
    return f"hsla({hue:.0f}, 70%, 72%, {alpha})"


def heatmap(frame: pl.DataFrame, value: str, *, title: str, x: str = "expert", y: str = "layer",
            colorscale: str = "Viridis", zmid: float | None = None, marks: pl.DataFrame | None = None,
            hover_label: str | None = None, clickable: bool = False) -> go.Figure:
    """Layer × expert heatmap of ``frame[value]``; ``marks`` (rows of x, y) are circled (e.g. flagged experts).

    ``clickable``: plotly.js cannot select heatmap cells, so a transparent square marker sits on every cell; a click
    selects it (Streamlit ``on_select``) and outlines the chosen cell."""
    xs = sorted(frame[x].unique().to_list())
    ys = sorted(frame[y].unique().to_list())
    z = np.full((len(ys), len(xs)), np.nan)
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    for a, b, v in zip(frame[x].to_list(), frame[y].to_list(), frame[value].to_list()):
        z[yi[b], xi[a]] = np.nan if v is None else v
    fig = go.Figure(go.Heatmap(
        z=z, x=xs, y=ys, colorscale=colorscale, zmid=zmid, colorbar=dict(title=hover_label or value),
        hovertemplate=f"{y} %{{y}}, {x} %{{x}}<br>{hover_label or value}: %{{z:.4g}}<extra></extra>"))
    if marks is not None and marks.height:
        fig.add_trace(go.Scatter(x=marks[x].to_list(), y=marks[y].to_list(), mode="markers", name="flagged",
                                 marker=dict(symbol="circle-open", size=14, color="red", line=dict(width=2)),
                                 hovertemplate=f"flagged: {y} %{{y}}, {x} %{{x}}<extra></extra>"))
    if clickable:
        gx, gy = np.meshgrid(xs, ys)
        fig.add_trace(go.Scatter(
            x=gx.ravel().tolist(), y=gy.ravel().tolist(), mode="markers", name="cells", showlegend=False,
            customdata=z.ravel(), hovertemplate=f"{y} %{{y}}, {x} %{{x}}<br>{hover_label or value}: "
                                               f"%{{customdata:.4g}}<extra></extra>",
            marker=dict(symbol="square", size=max(6, min(28, 560 // max(len(xs), 1))), color="rgba(0,0,0,0)",
                        line=dict(width=0)),
            selected=dict(marker=dict(color="rgba(255,255,255,0.35)")), unselected=dict(marker=dict(opacity=0))))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, **_LAYOUT)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category" if len(xs) <= 64 else "linear")
    return fig


def lines(frame: pl.DataFrame, x: str, y: str, *, color: str | None = None, title: str, y_title: str | None = None,
          band: tuple[str, str] | None = None, dash_by: dict[str, str] | None = None, markers: bool = True) -> go.Figure:
    """One line per value of ``color`` (or a single line); ``band`` = (low, high) columns drawn as a shaded CI."""
    fig = go.Figure()
    groups = [(None, frame)] if color is None else [
        (g, frame.filter(pl.col(color) == g)) for g in sorted(frame[color].unique().to_list(), key=_sort_key)]
    for g, sub in groups:
        sub = sub.sort(x)
        name = str(g) if g is not None else y
        if band is not None and sub[band[0]].null_count() < sub.height:
            xs = sub[x].to_list()
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=sub[band[1]].to_list() + sub[band[0]].to_list()[::-1],
                                     fill="toself", line=dict(width=0), opacity=0.2, showlegend=False,
                                     hoverinfo="skip", legendgroup=name))
        fig.add_trace(go.Scatter(x=sub[x].to_list(), y=sub[y].to_list(), name=name, legendgroup=name,
                                 mode="lines+markers" if markers else "lines",
                                 line=dict(dash=(dash_by or {}).get(str(g), "solid"))))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y_title or y, **_LAYOUT)
    return fig


def _sort_key(v):
    return (v is None, str(type(v)), v if v is not None else 0)


def bars(frame: pl.DataFrame, x: str, y: str, *, title: str, color: str | None = None,
         orientation: str = "v") -> go.Figure:
    xs, ys = frame[x].to_list(), frame[y].to_list()
    kw = dict(x=xs, y=ys) if orientation == "v" else dict(x=ys, y=xs, orientation="h")
    marker = dict(color=[expert_color(v) for v in frame[color].to_list()]) if color else None
    fig = go.Figure(go.Bar(**kw, marker=marker))
    fig.update_layout(title=title, xaxis_title=x if orientation == "v" else y,
                      yaxis_title=y if orientation == "v" else x, **_LAYOUT)
    if orientation == "h":
        fig.update_yaxes(autorange="reversed", type="category")
    else:
        fig.update_xaxes(type="category")
    return fig


def token_grid(tokens: list[str], layers: tuple[int, ...], experts: np.ndarray, weights: np.ndarray, *,
               title: str, changed: np.ndarray | None = None) -> go.Figure:
    """Layer × token grid of one sequence: colour = top-1 expert, cell text = its id, hover = the top-k experts and
    weights; ``changed[l, t]`` (optional) outlines the cells whose top-k set differs from a compared run."""
    L, T, k = experts.shape
    top1 = experts[:, :, 0].astype(float)
    top1[top1 < 0] = np.nan
    hover = np.empty((L, T), dtype=object)
    for li in range(L):
        for t in range(T):
            picks = " ".join(f"e{int(e)}:{w:.2f}" for e, w in zip(experts[li, t], weights[li, t]) if e >= 0)
            hover[li, t] = f"{tokens[t]!r} (pos {t})<br>layer {layers[li]}: {picks}"
    x = list(range(T))
    fig = go.Figure(go.Heatmap(z=top1, x=x, y=[str(l) for l in layers], text=np.where(np.isnan(top1), "", np.nan_to_num(top1).astype(int).astype(str)),
                               texttemplate="%{text}" if T <= 80 else None, customdata=hover,
                               hovertemplate="%{customdata}<extra></extra>", colorscale="Rainbow", showscale=False))
    if changed is not None and changed.any():
        li, ti = np.nonzero(changed)
        fig.add_trace(go.Scatter(x=ti.tolist(), y=[str(layers[i]) for i in li], mode="markers", name="top-k differs",
                                 marker=dict(symbol="square-open", size=16, color="black", line=dict(width=2)),
                                 hoverinfo="skip"))
    fig.update_layout(title=title, xaxis=dict(title="token", tickmode="array", tickvals=x,
                                              ticktext=[_short(t) for t in tokens], tickangle=-60),
                      yaxis=dict(title="layer", autorange="reversed", type="category"), **_LAYOUT)
    return fig


def _short(text: str, n: int = 8) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= n else text[: n - 1] + "…"


def divergence_lines(frame: pl.DataFrame, value: str, *, title: str) -> go.Figure:
    return lines(frame, "layer", value, color="lang", title=title, y_title=value)
