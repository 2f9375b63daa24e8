"""Compiled (numba) loops behind ``lrc.py``: per-sequence sufficient statistics for SRP and SCH.

Both kernels run one sequence per ``prange`` iteration (sequences are independent samples, moe-lrc
``config.json::sample_length``), so windows and caches never cross sequences, and both take the routing in the
compact ``experts[L, N, k]`` layout of ``routing_arrays.load_routing`` without copying it.

``srp_histograms``  — for one layer and one window length m, per sequence the histogram ``H[c]`` = number of
    (sliding window, expert) pairs whose window count is c (algorithms.md §1.2; moe-lrc ``src/30_srp_calc.py``
    builds the same histogram per sample with ``scatter_add_`` over the doubled masks).
``band_counts``     — a Mattson stack simulation of a priority-replacement cache (algorithms.md §1.3; moe-lrc
    ``src/41_sch_calc.py::calc_fsf`` and ``src/50_chr_calc.py``): per sequence, the number of requests served at
    each stack depth d (per-layer caches) or in each band of g = L depths (the shared model-level cache, whose
    capacities ρ·k·L are all multiples of L), so ``hits(C) = Σ_{d<C} count[d]`` for every capacity C at once.
    One parallel pass covers every window length m and every scope (each layer's cache and the shared one).

Speed notes (measured on the 1M-token benchmark, ``benchmarks/lrc_speed.py``): the shared cache keeps only the
bands' exact minima, so a request crosses ~10 bands instead of ~140 positions; priorities carry their slot in
their low bits, so a band minimum is one branch-free scan; the per-layer stack (g = 1) uses a branch-free carry
scan. Unpredictable branches, not arithmetic, were the cost of the plain carry scan.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

POLICY_SCH, POLICY_LRU, POLICY_LFU, POLICY_BELADY = 0, 1, 2, 3
_BIG = np.int64(2**62)


@njit(cache=True, parallel=True, nogil=True)
def srp_histograms(experts, seq_start, num_experts, m):  # pragma: no cover - compiled
    """H[s, c] for sequence s: Σ over sliding windows [w, w+m) ⊂ sequence s and experts e of [count(w, e) == c].

    experts: [N, k] one layer's executed top-k. Each expert's count is constant between two windows where a token
    using it enters or leaves, so a run of equal counts is added at once when it ends: O(T·k) per sequence.
    Sequences shorter than m have no window (all zeros)."""
    n_seq = seq_start.shape[0] - 1
    k = experts.shape[1]
    out = np.zeros((n_seq, m + 1), np.int64)
    for s in prange(n_seq):
        a = seq_start[s]
        T = seq_start[s + 1] - a
        if T < m:
            continue
        cnt = np.zeros(num_experts, np.int64)
        last = np.zeros(num_experts, np.int64)
        for t in range(m):
            for r in range(k):
                cnt[experts[a + t, r]] += 1
        for w in range(1, T - m + 1):
            for r in range(k):  # token w-1 leaves
                e = experts[a + w - 1, r]
                out[s, cnt[e]] += w - last[e]
                last[e] = w
                cnt[e] -= 1
            for r in range(k):  # token w+m-1 enters
                e = experts[a + w + m - 1, r]
                out[s, cnt[e]] += w - last[e]
                last[e] = w
                cnt[e] += 1
        n_win = T - m + 1
        for e in range(num_experts):
            out[s, cnt[e]] += n_win - last[e]
    return out


@njit(cache=True, nogil=True, inline="always")
def _rescan(skey, b, g, size, bmin):  # pragma: no cover - compiled
    # a pure minimum (vectorisable, no unpredictable branch): the slot rides in the key's low bits
    lo = b * g
    hi = min(lo + g, size)
    best = _BIG
    for q in range(lo, hi):
        best = min(best, skey[q])
    bmin[b] = best


@njit(cache=True, nogil=True)
def _simulate(experts, a, T, l0, Lc, num_experts, policy, window, g, nb, out):  # pragma: no cover - compiled
    """Band counts of one sequence ``[a, a+T)`` and one cache over layers ``l0..l0+Lc-1`` into ``out[nb]``.

    The stack is kept only as bands of g positions (sets: a band's order never matters, since every capacity
    asked for is a multiple of g), each with its exact minimum key. A request for x in band j (or absent) puts
    x into band 0 in place of band 0's lowest item, which becomes the carry; at each band b < j whose minimum is
    below the carry the two trade places (the item a size-g·(b+1) cache evicts is the lowest of bands 0..b's
    content other than x, Mattson et al. 1970); the carry finally takes x's old slot (or a new slot, or leaves
    the kept top ``nb·g`` positions). g = 1 is the plain Mattson stack.

    Stored keys are ``priority << sb | (slot − band start)``: priorities are unique (they end in the request
    counter), so the order is the priority order and a band's minimum also names its slot."""
    U = Lc * num_experts
    cap = nb * g
    k = experts.shape[2]
    per_tok = Lc * k
    R = T * per_tok
    tb = 1  # bits of the request counter: priority = (count << tb) | counter
    while (1 << tb) <= R:
        tb += 1
    sb = 0  # bits of a slot offset inside a band
    while (1 << sb) < g:
        sb += 1
    smask = (1 << sb) - 1
    stack = np.empty(cap, np.int64)
    skey = np.full(cap, _BIG, np.int64)  # encoded key of stack[q], contiguous for the band minimum
    # exact minimum of skey over each band's occupied slots (for g = 1, skey itself)
    bmin = skey if g == 1 else np.full(nb, _BIG, np.int64)
    rec = np.empty(nb + 1, np.int64)  # bands where the carry trades places
    band = np.arange(cap) // g  # band of a slot (a table: an integer division per request costs more)
    bstart = band * g
    pos = np.full(U, -1, np.int64)
    seen = np.zeros(U, np.bool_)
    aux = np.zeros(U, np.int64)  # SCH: look-ahead counts; LFU: access counts; BELADY: next-use times below
    ts_of = np.zeros(U, np.int64)
    nxt = np.empty(0, np.int64)
    if policy == POLICY_BELADY:
        # request j has time j+1; an item never requested again gets time R+item+1 (moe-lrc calc_beladi)
        nxt = np.empty(R, np.int64)
        for y in range(U):
            aux[y] = R + y + 1
        j = R - 1
        for t in range(T - 1, -1, -1):
            for l in range(Lc - 1, -1, -1):
                for r in range(k - 1, -1, -1):
                    y = l * num_experts + experts[l0 + l, a + t, r]
                    nxt[j] = aux[y]
                    aux[y] = j + 1
                    j -= 1
    elif policy == POLICY_SCH:
        for t in range(min(window, T)):
            for l in range(Lc):
                for r in range(k):
                    aux[l * num_experts + experts[l0 + l, a + t, r]] += 1
    size = 0
    uni = 0
    ts = 0
    for t in range(T):
        # hits, against the state before this token
        n_new = uni
        for l in range(Lc):
            for r in range(k):
                y = l * num_experts + experts[l0 + l, a + t, r]
                d = pos[y]
                if d >= 0:
                    out[band[d]] += 1
                elif not seen[y]:
                    if n_new < cap:
                        out[band[n_new]] += 1
                    n_new += 1
        # updates, one request at a time
        for l in range(Lc):
            for r in range(k):
                x = l * num_experts + experts[l0 + l, a + t, r]
                ts += 1
                if policy == POLICY_SCH:
                    aux[x] -= 1
                    kx = ((aux[x] << tb) | ts) << sb
                elif policy == POLICY_LRU:
                    kx = ts << sb
                elif policy == POLICY_LFU:
                    aux[x] += 1
                    kx = ((aux[x] << tb) | ts) << sb
                else:
                    kx = -(nxt[ts - 1] << sb)
                ts_of[x] = ts
                if not seen[x]:
                    seen[x] = True
                    uni += 1
                p = pos[x]
                if p >= 0 and p < g:  # in band 0 already: no cache of size >= g changes its content
                    kx |= p
                    skey[p] = kx
                    if kx < bmin[0]:
                        bmin[0] = kx
                    elif (bmin[0] & smask) == p:
                        _rescan(skey, 0, g, size, bmin)
                    continue
                if size < g:  # band 0 not full yet (x is new): it just joins
                    kx |= size
                    stack[size] = x
                    skey[size] = kx
                    pos[x] = size
                    if kx < bmin[0]:
                        bmin[0] = kx
                    size += 1
                    continue
                q = bmin[0] & smask
                carry = stack[q]
                ck = skey[q]
                stack[q] = x
                skey[q] = kx | q
                pos[x] = q
                _rescan(skey, 0, g, size, bmin)
                jt = band[p] if p >= 0 else (band[size] if size < cap else nb)
                if g == 1:  # the plain stack: a branch-free carry scan (the swaps are unpredictable)
                    for b in range(1, jt):
                        ky = skey[b]
                        y = stack[b]
                        lt = ky < ck
                        stack[b] = carry if lt else y
                        carry = y if lt else carry
                        skey[b] = max(ky, ck)
                        ck = min(ky, ck)
                    for b in range(1, jt):
                        pos[stack[b]] = b
                else:
                    # the carry trades places exactly at the bands whose minimum is a new low of the running
                    # minimum (ck, bmin[1], ...): find them branch-free first, then trade
                    n_rec = 0
                    lo = ck
                    for b in range(1, jt):
                        rec[n_rec] = b
                        n_rec += bmin[b] < lo
                        lo = min(lo, bmin[b])
                    for i_rec in range(n_rec):
                        b = rec[i_rec]
                        q = b * g + (bmin[b] & smask)
                        y = stack[q]
                        ky = skey[q]
                        stack[q] = carry
                        skey[q] = (ck & ~smask) | (q - b * g)
                        pos[carry] = q
                        carry = y
                        ck = ky
                        _rescan(skey, b, g, size, bmin)
                if p >= 0:  # the carry takes x's old slot
                    o = p - bstart[p]
                    ck = (ck & ~smask) | o
                    stack[p] = carry
                    skey[p] = ck
                    pos[carry] = p
                    if (bmin[jt] & smask) == o:
                        _rescan(skey, jt, g, size, bmin)
                    elif ck < bmin[jt]:
                        bmin[jt] = ck
                elif size < cap:  # a new slot at the bottom
                    ck = (ck & ~smask) | (size - bstart[size])
                    stack[size] = carry
                    skey[size] = ck
                    pos[carry] = size
                    if ck < bmin[jt]:
                        bmin[jt] = ck
                    size += 1
                else:  # pushed below the kept positions: a miss for every capacity asked for
                    pos[carry] = -1
        if policy == POLICY_SCH and t + window < T:
            for l in range(Lc):
                for r in range(k):
                    y = l * num_experts + experts[l0 + l, a + t + window, r]
                    aux[y] += 1
                    q = pos[y]
                    if q >= 0:  # a key only grows here: the band minimum moves only if it was y
                        o = q - bstart[q]
                        skey[q] = (((aux[y] << tb) | ts_of[y]) << sb) | o
                        if (bmin[band[q]] & smask) == o:
                            _rescan(skey, band[q], g, size, bmin)


@njit(cache=True, parallel=True, nogil=True)
def band_counts(experts, seq_start, seq_sel, num_experts, policy, windows, layer_cap, model_g, model_nb):
    # pragma: no cover - compiled
    """All caches of one policy in one parallel pass over the selected sequences.

    Returns ``(layer[nw, L, n_sel, layer_cap], model[nw, n_sel, model_nb])``: per window length, the requests
    served at each stack depth d < layer_cap of every layer's own cache, and at each band of ``model_g`` depths
    of the shared cache over all L layers (``layer_cap = 0`` / ``model_nb = 0`` skip a scope). One work item is
    one sequence with every window and scope, so the threads stay balanced."""
    L = experts.shape[0]
    nw = windows.shape[0]
    n_sel = seq_sel.shape[0]
    lay = np.zeros((nw, L if layer_cap > 0 else 0, n_sel, max(layer_cap, 1)), np.int64)
    mod = np.zeros((nw, n_sel, max(model_nb, 1)), np.int64)
    for i in prange(n_sel):
        s = seq_sel[i]
        a = seq_start[s]
        T = seq_start[s + 1] - a
        for w in range(nw):
            if model_nb > 0:
                _simulate(experts, a, T, 0, L, num_experts, policy, windows[w], model_g, model_nb, mod[w, i])
            if layer_cap > 0:
                for l in range(L):
                    _simulate(experts, a, T, l, 1, num_experts, policy, windows[w], 1, layer_cap, lay[w, l, i])
    return lay, mod
