"""Compiled (numba) loops behind ``lrc.py``: per-sequence sufficient statistics for SRP and SCH.

Both kernels run one sequence per ``prange`` iteration (sequences are independent samples, moe-lrc
``config.json::sample_length``), so windows and caches never cross sequences, and both take the routing in the
compact ``experts[L, N, k]`` layout of ``routing_arrays.load_routing`` without copying it.

``srp_histograms``  — for one layer and one window length m, per sequence the histogram ``H[c]`` = number of
    (sliding window, expert) pairs whose window count is c (algorithms.md §1.2; moe-lrc ``src/30_srp_calc.py``
    builds the same histogram per sample with ``scatter_add_`` over the doubled masks).
``stack_depths``    — a Mattson stack simulation of a priority-replacement cache (algorithms.md §1.3; moe-lrc
    ``src/41_sch_calc.py::calc_fsf`` and ``src/50_chr_calc.py``): per sequence, the number of requests served at
    each stack depth d, so ``hits(C) = Σ_{d<C} count[d]`` for every capacity C at once.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

POLICY_SCH, POLICY_LRU, POLICY_LFU, POLICY_BELADY = 0, 1, 2, 3
_SHIFT = np.int64(1) << np.int64(32)
_BIG = np.int64(2**62)
_BSH = 4  # stack blocks of 16 positions


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


@njit(cache=True, parallel=True, nogil=True)
def stack_depths(experts, seq_start, seq_sel, num_experts, policy, window, cmax):  # pragma: no cover - compiled
    """count[i, d]: requests of sequence ``seq_sel[i]`` served at stack depth d < cmax (0 = top).

    experts: [Lc, N, k]. A token's requests are its layers' top-k concatenated in layer order, each in rank order,
    as item ``l·E + e`` (one shared cache over the Lc layers' Σ E items; Lc = 1 is a per-layer cache).

    Per token, every request is first counted against the state before the token (a hit for C > its depth; an
    item never seen before is a hit for C > the number of distinct items seen before it, the cold-start rule),
    then the requests update the stack one by one. A request for x at depth p (or p = stack size when x is
    absent) puts x on top and carries the running minimum-priority item down through positions 1..p-1: at
    each position the lower of (carry, occupant) moves on — the item a size-i cache evicts is the lowest
    priority of its content other than x (Mattson et al. 1970). Only the top ``cmax`` positions are kept: they
    never depend on deeper ones, and deeper items are misses for every C <= cmax.

    Priority (evict the lowest; ts = running request counter, so keys are unique):
      SCH    (n, ts), n = tokens of the look-ahead segment [t+1, t+window) using the item, or [t, t+window)
             for the current token's requests not processed yet;
      LRU    ts;   LFU  (accesses since the sequence start, ts);   BELADY  −(time of next request).
    """
    n_sel = seq_sel.shape[0]
    Lc = experts.shape[0]
    k = experts.shape[2]
    U = Lc * num_experts
    out = np.zeros((n_sel, cmax), np.int64)
    for i in prange(n_sel):
        s = seq_sel[i]
        a = seq_start[s]
        T = seq_start[s + 1] - a
        stack = np.empty(cmax, np.int64)
        skey = np.empty(cmax, np.int64)  # key of stack[q], contiguous for the carry scan
        bmin = np.full((cmax >> _BSH) + 1, _BIG, np.int64)  # lower bound of skey over each block
        pos = np.full(U, -1, np.int64)
        seen = np.zeros(U, np.bool_)
        key = np.zeros(U, np.int64)
        aux = np.zeros(U, np.int64)  # SCH: look-ahead counts; LFU: access counts; BELADY: next-use times below
        ts_of = np.zeros(U, np.int64)
        per_tok = Lc * k
        nxt = np.empty(0, np.int64)
        if policy == POLICY_BELADY:
            # request j has time j+1; an item never requested again gets time R+item+1 (moe-lrc calc_beladi)
            R = T * per_tok
            nxt = np.empty(R, np.int64)
            for y in range(U):
                aux[y] = R + y + 1
            j = R - 1
            for t in range(T - 1, -1, -1):
                for l in range(Lc - 1, -1, -1):
                    for r in range(k - 1, -1, -1):
                        y = l * num_experts + experts[l, a + t, r]
                        nxt[j] = aux[y]
                        aux[y] = j + 1
                        j -= 1
        elif policy == POLICY_SCH:
            for t in range(min(window, T)):
                for l in range(Lc):
                    for r in range(k):
                        aux[l * num_experts + experts[l, a + t, r]] += 1
            for y in range(U):
                key[y] = aux[y] * _SHIFT
        size = 0
        uni = 0
        ts = 0
        for t in range(T):
            # hits, against the state before this token
            n_new = uni
            for l in range(Lc):
                for r in range(k):
                    y = l * num_experts + experts[l, a + t, r]
                    d = pos[y]
                    if d >= 0:
                        out[i, d] += 1
                    elif not seen[y]:
                        if n_new < cmax:
                            out[i, n_new] += 1
                        n_new += 1
            # updates, one request at a time
            for l in range(Lc):
                for r in range(k):
                    x = l * num_experts + experts[l, a + t, r]
                    ts += 1
                    if policy == POLICY_SCH:
                        aux[x] -= 1
                        key[x] = aux[x] * _SHIFT + ts
                    elif policy == POLICY_LRU:
                        key[x] = ts
                    elif policy == POLICY_LFU:
                        aux[x] += 1
                        key[x] = aux[x] * _SHIFT + ts
                    else:
                        key[x] = -nxt[ts - 1]
                    ts_of[x] = ts
                    if not seen[x]:
                        seen[x] = True
                        uni += 1
                    p = pos[x]
                    if p == 0:  # already on top; only its key changed
                        skey[0] = key[x]
                        bmin[0] = min(bmin[0], key[x])
                        continue
                    if p < 0:
                        p = size
                        if size == 0:
                            stack[0] = x
                            skey[0] = key[x]
                            bmin[0] = key[x]
                            pos[x] = 0
                            size = 1
                            continue
                    carry = stack[0]
                    ck = skey[0]
                    q = 1
                    while q < p:
                        b = q >> _BSH
                        bend = (b + 1) << _BSH
                        full = q == (b << _BSH) and bend <= p
                        if bend > p:
                            bend = p
                        if bmin[b] > ck:  # no key in the block below the carry: nothing there moves
                            q = bend
                            continue
                        lo = _BIG
                        for qq in range(q, bend):
                            ky = skey[qq]
                            if ky < ck:
                                y = stack[qq]
                                stack[qq] = carry
                                skey[qq] = ck
                                pos[carry] = qq
                                carry = y
                                ck = ky
                            lo = min(lo, skey[qq])
                        bmin[b] = lo if full else min(bmin[b], lo)
                        q = bend
                    if p < cmax:
                        stack[p] = carry
                        skey[p] = ck
                        pos[carry] = p
                        bmin[p >> _BSH] = min(bmin[p >> _BSH], ck)
                        if p == size:
                            size += 1
                    else:
                        pos[carry] = -1
                    stack[0] = x
                    skey[0] = key[x]
                    bmin[0] = min(bmin[0], key[x])
                    pos[x] = 0
            if policy == POLICY_SCH and t + window < T:
                for l in range(Lc):
                    for r in range(k):
                        y = l * num_experts + experts[l, a + t + window, r]
                        aux[y] += 1
                        key[y] = aux[y] * _SHIFT + ts_of[y]
                        if pos[y] >= 0:
                            skey[pos[y]] = key[y]
    return out
