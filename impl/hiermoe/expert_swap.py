"""HierD-ES: HierMoE's dedup-aware hierarchical expert swap (Section IV, Eqs. (8)-(11), Fig. 8,
Theorem 1), planning side. `impl.common.expert_migration` executes the chosen swap.

What is optimised. Swapping the slots of two experts r, c changes, at every topology level L
(U[L] groups of E / U[L] consecutive slots, level D = single GPUs), how many tokens touch each
group: the duplicate-free counts Z_L[r, c, :] that set the volume of the HierD-AlltoAll steps.
For the route of dimension d (Inter-1 .. Inter-(d-1), Intra-(d-1)) the modeled time of the swap is

    Q_d[r, c] = sum_{i<d} (alpha_inter-i + beta_inter-i * N_inter-i[r, c]) + alpha_intra + beta_intra * N_intra[r, c]
    N[r, c]   = fan * maxfn(p[r, c, :]) * M * v                                            (Eqs. (8), (9))

with fan = U[L] / U[P] ranks per sub-group (parent level P) and maxfn plain max, smooth-max
max(x) * (sum (x / max(x))^gamma)^(1/gamma) (Eq. (11), gamma = 10) or log-sum-exp. The best single
swap is argmin Q (Theorem 1); it is made only when it beats the current placement, so "no swap"
is always a candidate. d is d* of Eq. (6) (`impl.hiermoe.dimension`), chosen on the current
placement, or fixed (HD2-MoE uses d = 2).

Z by the four-case rule (Fig. 8). Start from the no-swap counts z0 and, for every token and pair
(A selected, B not) in different groups: B's group gains the token if the token touched it
nowhere before (+1, cases 1/2), A's group loses it if A was its only expert there (-1, cases 2/4).
`z_four_case` runs that update literally, O(T*K*E) per level (the paper's O(D*T*K*E)). Summed over
tokens, the four cases factor through four small tables per level (`LevelStats`):

    x[s, h]   tokens that select s and touch group h nowhere            (+1 of cases 1/2)
    solo[s]   tokens for which s is the only selected expert of its group (-1 of cases 2/4)
    w[s, s']  tokens that select both s and s', s the only one of its group (both selected: no -1)

    Z[s1, s2, grp(s2)] = z0[grp(s2)] + x[s1, grp(s2)] - solo[s2] + w[s2, s1]
    Z[s1, s2, grp(s1)] = z0[grp(s1)] + x[s2, grp(s1)] - solo[s1] + w[s1, s2]

(other groups unchanged; same-group pairs change nothing), built for all levels in O(D*T*K^2)
from each token's sorted slot list (one `bincount` of one index buffer, `_raw_tables`) and
evaluated for all pairs in O(D*E^2), the route's levels stacked (`StackedLevels`). Both methods
give the same Z, exactly (tests compare them with a recount from scratch); 'factored' is the
default, 'four_case' the literal reference (over 100x slower at the paper's scale).

Agreement [reconstruction: the paper does not say how ranks agree]. All counts are *global*: every
rank computes its tokens' tables, one all-reduce (sum) adds them. Global per-group counts are exact
after any swap at every level, so the second-order effect the per-level formulation leaves open (a
swap across nodes changes the token sets of the lower levels) does not arise. The paper's p is a
per-rank count (the padded per-rank buffer); from global counts we use its mean over the G / U[P]
ranks that send into a level-L group in that step: p = Z * U[P] / G.

Split decision [ours]. The E^2 pairs are split by rows: each rank screens the pairs (s1, s2) whose
s1 is one of its own GPU's E / G slots and evaluates exactly those of them with s1 < s2, so every
unordered pair is evaluated by one rank. Three scalar collectives combine the ranks: the screened
minimum (min), the exact minimum (min), and each rank's best tie-break key with its Q and tie
count (all-gather). The values of a pair are computed bit for bit alike from either row, and all
exact values come from the same integers on every rank, so the split decision equals the one-process
decision (tests run both against an exhaustive search); a 4-int all-reduce verifies the agreement.

Evaluation, ties and hysteresis. The pairs are screened in float32 (a few passes over the rows per
level); the pairs within a relative 1e-5 of the screened minimum are evaluated again in float64 from
their exact counts, with the current placement. Pairs whose Q lies within a relative 1e-9 of the
minimum are tied and the smallest (r, c), r < c logical ids, among them wins; the swap is made only
if the minimum beats the current placement's Q by more than that tolerance. Rounding therefore
never decides, and an exhaustive search over all pairs with the same objective and rule picks the
same pair.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import torch

from impl.common.comm import Comm
from impl.common.costmodel import HardwareProfile, load_profile
from impl.common.dispatcher import ExpertPlacement, check_expert_parallel
from impl.common.expert_migration import PlacementPlanner
from impl.common.registry import register
from impl.common.topology import Topology
from impl.hiermoe.dimension import (DispatchCounts, RouteCounts, check_profile, choose_from_counts, counts_from_slots,
                                    local_counts, route_steps, selected_slots, step_name_of)

__all__ = ["MAX_FNS", "Z_METHODS", "LevelStats", "StackedLevels", "SwapStats", "SwapDecision", "HierDExpertSwap", "apply_max_fn",
           "selected_slots", "level_stats", "z_four_case", "local_swap_stats", "global_swap_stats",
           "gather_swap_stats", "swap_stats_from_slots", "swap_tables", "swap_stats_from_tables", "swap_objective",
           "pair_objectives", "decide_swap", "stats_bytes"]

MAX_FNS = ("max", "smooth", "lse")
Z_METHODS = ("factored", "four_case")
REL_TOL = 1e-9       # pairs within this relative distance of the best are tied
SCREEN_TOL = 1e-5    # screening margin: far above float32 rounding of Q, far below real differences


def _check_options(max_fn: str, gamma: float, z_method: str = "factored") -> None:
    if max_fn not in MAX_FNS:
        raise ValueError(f"max_fn: {max_fn!r} is not allowed; allowed: {', '.join(MAX_FNS)}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0 < gamma < math.inf):
        raise ValueError(f"gamma: {gamma!r} is not allowed; expected a finite number > 0 (paper default 10)")
    if z_method not in Z_METHODS:
        raise ValueError(f"z_method: {z_method!r} is not allowed; allowed: {', '.join(Z_METHODS)}")


# ==========================================================================================
# the max function (Eq. (9) / Eq. (11))
# ==========================================================================================
def apply_max_fn(x_NU: torch.Tensor, max_fn: str = "smooth", gamma: float = 10.0) -> torch.Tensor:
    """Row-wise max function of [N, U] -> float64 [N]: plain max, smooth-max
    max(x) * (sum (x_i / max x)^gamma)^(1/gamma) (0 for an all-zero row) or log-sum-exp."""
    _check_options(max_fn, gamma)
    x = x_NU.to(torch.float64)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    if max_fn == "lse":
        return torch.logsumexp(x, dim=1)
    m = x.max(dim=1).values
    if max_fn == "max":
        return m
    safe = torch.where(m > 0, m, torch.ones_like(m))
    total = ((x / safe.unsqueeze(1)) ** gamma).sum(1)
    return torch.where(m > 0, m * total ** (1.0 / gamma), torch.zeros_like(m))


# ==========================================================================================
# per-level statistics
# ==========================================================================================

@dataclass(frozen=True, eq=False)
class StackedLevels:
    """The four-case tables of several levels (int64), stacked along a level axis and padded to the
    widest level (`width` groups; padded groups count 0), so that one set of tensor operations
    serves every level a route uses:

        z0 [D, width]   x [D, E, width]   solo [D, E]   w [D, E, E]   groups: U of each level

    `pair_values` and `swapped_counts` take `levels`, indices into the level axis (default all)."""

    groups: tuple[int, ...]
    z0: torch.Tensor
    x: torch.Tensor
    solo: torch.Tensor
    w: torch.Tensor

    @classmethod
    def from_tables(cls, z0_X: torch.Tensor, co_EX: torch.Tensor, w_DEE: torch.Tensor, groups: Sequence[int]
                    ) -> "StackedLevels":
        """From `_tables_of` (z0 = the route table summed over ranks): x = n - co, where n[s]
        (tokens selecting s) is co at s's own group."""
        E, groups = co_EX.shape[0], tuple(groups)
        cols = _padded_columns(groups)
        n_E = co_EX[torch.arange(E), torch.arange(E) // (E // groups[0])]
        x_EX = torch.cat([n_E.unsqueeze(1) - co_EX, torch.zeros(E, 1, dtype=co_EX.dtype)], dim=1)
        z0 = torch.cat([z0_X, z0_X.new_zeros(1)])[cols]
        x = x_EX[:, cols].permute(1, 0, 2).masked_fill_((cols == sum(groups)).unsqueeze(1), 0)
        return cls(groups, z0, x, w_DEE.diagonal(0, 1, 2), w_DEE)

    @property
    def num_experts(self) -> int:
        return self.w.shape[-1]

    def level(self, index: int) -> "LevelStats":
        """The tables of level axis entry `index` (level L = index + 1 of a hierarchy)."""
        U = self.groups[index]
        return LevelStats(self.z0[index, :U], self.x[index, :, :U], self.solo[index], self.w[index])

    def _index(self, levels: Sequence[int] | None):
        levels = list(range(len(self.groups))) if levels is None else list(levels)
        U = torch.tensor([self.groups[i] for i in levels])
        return torch.tensor(levels), U, (torch.arange(self.num_experts).view(1, -1) // (self.num_experts // U).view(-1, 1))

    def swapped_counts(self, s1: torch.Tensor, s2: torch.Tensor, levels: Sequence[int] | None = None) -> torch.Tensor:
        """int64 [levels, C, width]: the group counts after swapping slots s1[i] and s2[i] (Z[s1, s2, :])."""
        sel, U, grp_LE = self._index(levels)
        C = s1.numel()
        z0 = self.z0.index_select(0, sel)
        x = self.x.index_select(0, sel)
        a, b = grp_LE[:, s1], grp_LE[:, s2]                                             # [nL, C]
        out = z0.unsqueeze(1).repeat(1, C, 1)
        solo = self.solo.index_select(0, sel)
        for g, enter, leave in ((b, s1, s2), (a, s2, s1)):      # group g: slot `leave` moves out, `enter` in
            new = z0.gather(1, g) + x[:, enter].gather(2, g.unsqueeze(2)).squeeze(2) - solo[:, leave] \
                + self.w[:, leave, enter].index_select(0, sel)
            out.scatter_(2, g.unsqueeze(2), torch.where(a != b, new, z0.gather(1, g)).unsqueeze(2))
        return out

    def pair_values(self, scales: Sequence[float], max_fn: str, gamma: float, dtype: torch.dtype = torch.float64,
                    rows: tuple[int, int] | None = None, levels: Sequence[int] | None = None) -> torch.Tensor:
        """[levels, n, E] in `dtype`: maxfn(scale * Z[s1, s2, :]) per level (scale per level) for the
        slots s1 in `rows` = [first, end) (default all; n = end - first) and every slot s2 (equal
        to `apply_max_fn` up to rounding).

        Only groups a = grp(s1) and b = grp(s2) change: the rows are taken in blocks of
        consecutive slots inside one group at every level, so a is one value per block, and
        p_b[s1, s2] is computed by the same operations as p_a[s2, s1], so the values are symmetric
        bit for bit whichever rows a caller takes."""
        _check_options(max_fn, gamma)
        E = self.num_experts
        sel, U, grp_LE = self._index(levels)
        nL, width = sel.numel(), self.z0.shape[1]
        first, end = (0, E) if rows is None else rows
        if not 0 <= first < end <= E:
            raise ValueError(f"rows: {rows!r} is not allowed; expected 0 <= first < end <= {E}")
        blk = math.gcd(first, end, *(E // U).tolist())
        n, nb = end - first, (end - first) // blk
        a_LB = grp_LE[:, first:end:blk]                                                 # group of each block
        z0 = self.z0.index_select(0, sel).to(torch.float64)                             # [nL, width]
        x = self.x.index_select(0, sel)
        scale = torch.tensor(list(scales), dtype=torch.float64).view(nL, 1)
        p0 = z0 * scale
        h = torch.arange(width)
        real_LU = h.view(1, width) < U.view(nL, 1)
        # groups h that neither a nor b is: [level, block, b, h]
        keep = (real_LU.view(nL, 1, 1, width) & (h.view(1, 1, 1, width) != a_LB.view(nL, nb, 1, 1))
                & (h.view(1, 1, 1, width) != h.view(1, 1, width, 1)))

        def rest(table_LBU: torch.Tensor) -> torch.Tensor:                             # [level, block, 1, s2]
            return table_LBU.gather(2, grp_LE.view(nL, 1, E).expand(nL, nb, E)).to(dtype).view(nL, nb, 1, E)

        unchanged = apply_max_fn(torch.where(real_LU, p0, 0.0 if max_fn == "smooth" else -math.inf), max_fn, gamma)
        # Z[s1, s2, a] = z0[a] + x[s2, a] - solo[s1] + w[s1, s2]; smooth-max works on Z / unit <= 1
        # (no overflow in float32), the others on the values scale * Z
        if max_fn == "smooth":
            unit = z0.amax(1) + x.amax((1, 2)).to(torch.float64) + 1.0
        else:
            unit = 1.0 / scale.view(nL)
        inv_unit = (1.0 / unit).to(dtype).view(nL, 1, 1, 1)
        xf = x.to(torch.float64)
        base_a = z0.gather(1, a_LB).unsqueeze(2) + xf.gather(2, a_LB.view(nL, 1, nb).expand(nL, E, nb)).transpose(1, 2)
        pa = self.w[:, first:end].index_select(0, sel).to(dtype).view(nL, nb, blk, E)
        pa.sub_(self.solo[:, first:end].index_select(0, sel).to(dtype).view(nL, nb, blk, 1))
        pa.add_(base_a.to(dtype).view(nL, nb, 1, E)).mul_(inv_unit)
        if n == E:                                                                     # all rows: p_b = p_a^T
            pb = pa.view(nL, E, E).transpose(1, 2).view(nL, nb, blk, E)
        else:
            base_b = (z0.unsqueeze(1) + xf[:, first:end]).gather(2, grp_LE.view(nL, 1, E).expand(nL, n, E))
            pb = self.w[:, :, first:end].index_select(0, sel).transpose(1, 2).to(dtype).contiguous()
            pb = pb.view(nL, nb, blk, E)
            pb.sub_(self.solo.index_select(0, sel).to(dtype).view(nL, 1, 1, E))
            pb.add_(base_b.to(dtype).view(nL, nb, blk, E)).mul_(inv_unit)
        if max_fn == "smooth":  # unit * scale * (sum over groups of (Z / unit)^gamma)^(1/gamma)
            rsum = torch.where(keep, _power(z0 / unit.view(nL, 1), gamma).view(nL, 1, 1, width), 0.0).sum(3)
            power = _power(pa, gamma)
            val = power + (power.view(nL, E, E).transpose(1, 2).view(nL, nb, blk, E) if n == E else _power(pb, gamma))
            val = _lanewise(lambda t: t.pow_(1.0 / gamma), val.add_(rest(rsum)))
            val.mul_((unit * scale.view(nL)).to(dtype).view(nL, 1, 1, 1))
        else:
            rmax = torch.where(keep, p0.view(nL, 1, 1, width), -math.inf).amax(3)       # -inf when U = 2
            val = torch.maximum(pa, pb)
            val = torch.maximum(val, rest(rmax), out=val)
            if max_fn == "lse":
                finite = torch.where(rmax > -math.inf, rmax, 0.0)
                rlog = finite + _lanewise(torch.log, torch.where(
                    keep, _lanewise(torch.exp, p0.view(nL, 1, 1, width) - finite.unsqueeze(3)), 0.0).sum(3))
                top = val
                val = _lanewise(torch.exp, pa - top).add_(_lanewise(torch.exp, pb - top))
                val = _lanewise(torch.log, val.add_(_lanewise(torch.exp, rest(rlog) - top))).add_(top)
        same = a_LB.view(nL, nb, 1, 1) == grp_LE.view(nL, 1, 1, E)                       # a == b: no change
        for i in range(nL):
            val[i].masked_fill_(same[i], float(unchanged[i]))
        return val.view(nL, n, E)


@dataclass(frozen=True, eq=False)
class LevelStats:
    """The four-case tables of one level (int64): z0 [U], x [E, U], solo [E], w [E, E]."""

    z0: torch.Tensor
    x: torch.Tensor
    solo: torch.Tensor
    w: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.z0.numel()

    @property
    def num_experts(self) -> int:
        return self.solo.numel()

    def _stacked(self) -> StackedLevels:
        return StackedLevels((self.num_groups,), self.z0.unsqueeze(0), self.x.unsqueeze(0), self.solo.unsqueeze(0),
                             self.w.unsqueeze(0))

    def swapped_counts(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """int64 [C, U]: the group counts after swapping slots s1[i] and s2[i] (Z[s1, s2, :])."""
        return self._stacked().swapped_counts(s1, s2)[0]

    def z_tensor(self) -> torch.Tensor:
        """The full Z [E, E, U] (for tests and small cases)."""
        E = self.num_experts
        s1, s2 = torch.meshgrid(torch.arange(E), torch.arange(E), indexing="ij")
        return self.swapped_counts(s1.reshape(-1), s2.reshape(-1)).view(E, E, self.num_groups)

    def pair_values(self, scale: float, max_fn: str, gamma: float, dtype: torch.dtype = torch.float64,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
        """[n, E]: `StackedLevels.pair_values` of this level."""
        return self._stacked().pair_values([scale], max_fn, gamma, dtype, rows)[0]


_LANES = 64     # a multiple of twice the widest CPU vector (AVX-512: 16 float32 lanes)


def _lanewise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise transcendental (exp, log, pow), each element's value independent of
    where it sits. ATen's CPU loops compute a buffer's last len % (2 * vector width) elements, and
    those at the edges of the threads' chunks, with scalar code whose rounding differs from the
    vector code's; so the same input could give other bits in a row block than in the whole matrix
    (`StackedLevels.pair_values` promises identical bits). On a flat buffer padded to a multiple of
    _LANES * threads every element runs through the vector code."""
    flat, n = x.reshape(-1), x.numel()
    chunk = _LANES * torch.get_num_threads()
    padded = flat.new_ones(-(-n // chunk) * chunk)
    padded[:n] = flat
    return fn(padded)[:n].view(x.shape)


def _power(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """x ** gamma; by repeated squaring for integer gamma (a few multiplications, far cheaper than pow)."""
    if float(gamma).is_integer() and 1 <= gamma <= 64:
        n, out, base = int(gamma), None, x
        while n:
            if n & 1:
                out = base if out is None else out * base
            n >>= 1
            if n:
                base = base * base
        return out
    return x ** gamma


def _check_nested(num_groups: Sequence[int]) -> None:
    for coarse, fine in zip(num_groups, num_groups[1:]):
        if fine % coarse:
            raise ValueError(f"group counts {list(num_groups)} do not nest (each must divide the next)")


def _raw_tables(ids_TK: torch.Tensor, num_experts: int, num_groups: Sequence[int], rank: int = 0,
                num_ranks: int = 1) -> torch.Tensor:
    """The four-case counts of the tokens' sorted selected slots (padding: the sentinel slot E) as
    one flat int64 vector, all of them one `bincount` of one index buffer, O(D * T * K^2). Summed
    over ranks it is the global statistics; `_tables_of` reads it. Columns h run over the groups of
    every level (coarsest first), each level with one spare column; slots have one spare row E:

        route[rank, h]     tokens (of this rank) touching group h          [num_ranks, X1]
        co[s, h]           tokens selecting s that touch group h            [E + 1, X1]
        by_shared[l, s, s'] tokens selecting s and s' (s = s' included) for which s shares its
                           group with another selected slot at exactly l levels, l < D  [D, E + 1, E + 1]
        (one spare row for l = D)

    Sorted and nested, a slot shares its level-L group with another selected slot iff it shares
    it with a neighbour, so `shared` (the levels shared with any other slot) is the max of the
    levels shared with the previous and the next slot, and a slot starts its group's run at level L
    iff it shares fewer than L levels with the previous one. The sentinel has its own group U[L]
    at every level and its own row, so nothing is masked; the spares are dropped after the sum."""
    E, D = num_experts, len(num_groups)
    T, K = ids_TK.shape
    dev = ids_TK.device
    U = torch.tensor(list(num_groups), dtype=torch.int64, device=dev)
    E1, X1 = E + 1, sum(num_groups) + D
    off_co, off_w = num_ranks * X1, num_ranks * X1 + E1 * X1
    total = off_w + D * E1 * E1 + E1
    index = torch.int32 if total < 2 ** 31 else torch.int64
    ids = ids_TK.to(index)
    grp_DTK = ids.unsqueeze(0) // (E // U).to(index).view(D, 1, 1)     # sentinel E -> group U[L]
    same_TK = (grp_DTK[:, :, 1:] == grp_DTK[:, :, :-1]).sum(0, dtype=torch.int32)   # levels shared with slot k-1
    zero = torch.zeros(T, min(K, 1), dtype=torch.int32, device=dev)
    prev_TK = torch.cat([zero, same_TK], dim=1)
    shared_TK = torch.maximum(prev_TK, torch.cat([same_TK, zero], dim=1)).to(index)
    level = torch.arange(1, D + 1, dtype=torch.int32, device=dev).view(D, 1, 1)
    col_off = (torch.cumsum(U + 1, 0) - (U + 1)).to(index).view(D, 1, 1)
    n_z, n_co = D * T * K, D * T * K * K
    buf = torch.empty(n_z + n_co + T * K * K, dtype=index, device=dev)
    col_DTK = buf[:n_z].view(D, T, K)               # each slot's column if it starts its group's run, else spare
    torch.where(prev_TK.unsqueeze(0) < level, grp_DTK, U.to(index).view(D, 1, 1), out=col_DTK).add_(col_off)
    torch.add((ids * X1 + off_co).view(1, T, K, 1), col_DTK.view(D, T, 1, K),
              out=buf[n_z:n_z + n_co].view(D, T, K, K))
    row_TK = torch.where(shared_TK < D, shared_TK * (E1 * E1) + ids * E1, D * E1 * E1).add_(off_w)
    torch.add(row_TK.unsqueeze(2), ids.unsqueeze(1), out=buf[n_z + n_co:].view(T, K, K))
    col_DTK.add_(rank * X1)
    return torch.bincount(buf, minlength=total)


@lru_cache(maxsize=None)
def _real_columns(groups: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Indices of the real (not spare) columns of a `_raw_tables` layout, on `device` (int64, as
    `index_select` takes them): made once per (hierarchy, device), as every layer's swap reads them."""
    starts = itertools.accumulate([0] + [u + 1 for u in groups])
    return torch.cat([torch.arange(u) + o for u, o in zip(groups, starts)]).to(device)


@lru_cache(maxsize=None)
def _padded_columns(groups: tuple[int, ...]) -> torch.Tensor:
    """[D, width] column of each (level, group) in the concatenated layout; padding -> sum(groups)."""
    width, starts = max(groups), itertools.accumulate([0] + list(groups[:-1]))
    return torch.tensor([[o + u if u < U else sum(groups) for u in range(width)] for o, U in zip(starts, groups)])


def _tables_of(flat: torch.Tensor, num_experts: int, num_groups: Sequence[int], num_ranks: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(route [G, X], co [E, X], w [D, E, E]) of a `_raw_tables` vector (local or summed), spares
    dropped: w[L-1, s, s'] counts the tokens selecting s and s' for which s is the only selected
    slot of its level-L group (diagonal: the level's solo). Accumulates the levels of `flat` in
    place (w_L = sum of by_shared[l < L]); w is a view."""
    E, D, X = num_experts, len(num_groups), sum(num_groups)
    E1, X1 = E + 1, X + D
    off_co, off_w = num_ranks * X1, num_ranks * X1 + E1 * X1
    keep = _real_columns(tuple(num_groups), flat.device)
    route = flat[:off_co].view(num_ranks, X1).index_select(1, keep)
    co = flat[off_co:off_w].view(E1, X1)[:E].index_select(1, keep)
    w = flat[off_w:off_w + D * E1 * E1].view(D, E1, E1)
    for L in range(1, D):
        w[L].add_(w[L - 1])
    return route, co, w[:, :E, :E]


def level_stats(ids_TK: torch.Tensor, valid_TK: torch.Tensor, num_experts: int, num_groups: Sequence[int]
                ) -> list[LevelStats]:
    """The four-case tables of the tokens' selected slots (`selected_slots`) at every level of a
    hierarchy of `num_groups` (coarsest first, nested: each count divides the next). O(D * T * K^2)."""
    _check_nested(num_groups)
    ids = torch.where(valid_TK, ids_TK, num_experts)
    route, co, w = _tables_of(_raw_tables(ids, num_experts, num_groups), num_experts, num_groups, 1)
    stacked = StackedLevels.from_tables(route[0], co, w, num_groups)
    return [stacked.level(i) for i in range(len(num_groups))]


def z_four_case(map_TS: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Z [E, E, U] by the paper's incremental rule, literally (Fig. 8; digest pseudo-code): start
    at the no-swap counts, then for every token, every selected A and every unselected B in another
    group apply the four cases to Z[A, B] and Z[B, A]. O(T * K * E) for one level."""
    T, E = map_TS.shape
    U = num_groups
    g = E // U
    grp_E = torch.arange(E, device=map_TS.device) // g
    cnt_TU = map_TS.view(T, U, g).sum(2)
    Z = cnt_TU.gt(0).sum(0).unsqueeze(0).repeat(E * E, 1).view(-1)          # flat [E * E * U]
    t_P, A_P = map_TS.nonzero(as_tuple=True)
    B = torch.arange(E, device=map_TS.device).unsqueeze(0)                    # [1, E]
    gA, gB = grp_E[A_P].unsqueeze(1), grp_E[B]                                # [P, 1], [1, E]
    other = (gA != gB) & ~map_TS[t_P]                                         # B unselected, other group
    dB = other & (cnt_TU[t_P][:, grp_E] == 0)                                 # cases 1/2: +1 to grp(B)
    dA = other & (cnt_TU[t_P, grp_E[A_P]] == 1).unsqueeze(1)                  # cases 2/4: -1 to grp(A)
    A = A_P.unsqueeze(1)
    for r, c in ((A, B), (B, A)):                                             # Z is symmetric in (r, c)
        base = (r * E + c) * U
        Z.index_add_(0, (base + gB).expand_as(dB)[dB], torch.ones(int(dB.sum()), dtype=Z.dtype, device=Z.device))
        Z.index_add_(0, (base + gA).expand_as(dA)[dA], -torch.ones(int(dA.sum()), dtype=Z.dtype, device=Z.device))
    return Z.view(E, E, U)


# ==========================================================================================
# global statistics (what every rank plans from)
# ==========================================================================================
@dataclass(frozen=True, eq=False)
class SwapStats:
    """Global statistics of one layer and step: the per-origin dedup counts (d*, z0), the
    per-origin (token, expert) pair counts (the gate weights of d*'s model), and either the
    four-case tables of every level L = 1..D, stacked (`tables`, the 'factored' method), or the
    full Z [E, E, U[L]] of every level (`z`, the 'four_case' reference)."""

    counts: RouteCounts
    pairs: RouteCounts
    tables: StackedLevels | None = None
    z: tuple[torch.Tensor, ...] = ()

    @property
    def topology(self) -> Topology:
        return self.counts.topology

    @property
    def num_experts(self) -> int:
        return self.tables.num_experts if self.tables is not None else self.z[0].shape[0]

    @property
    def dispatch_counts(self) -> DispatchCounts:
        return DispatchCounts(self.counts, self.pairs, self.num_experts)

    def level(self, L: int):
        """LevelStats (factored) or Z (four_case) of level L."""
        return self.tables.level(L - 1) if self.tables is not None else self.z[L - 1]


def local_swap_stats(routing_map_TE: torch.Tensor, topology: Topology, placement: ExpertPlacement | None,
                     rank: int, z_method: str = "factored") -> torch.Tensor:
    """One rank's statistics as a flat int64 vector; the element-wise sum over ranks is the
    global statistics (`SwapStats` via `_unflatten`): the rank's row of the per-origin pair
    counts, then the `_raw_tables` of the rank's tokens, or ('four_case') the per-origin dedup
    route table (this rank's row) and Z of every level."""
    _check_options("max", 1.0, z_method)
    if routing_map_TE.dim() != 2 or routing_map_TE.dtype != torch.bool:
        raise ValueError(f"routing_map_TE must be a 2-D bool tensor [T, E], got dtype {routing_map_TE.dtype} "
                         f"and shape {tuple(routing_map_TE.shape)}")
    E, groups = routing_map_TE.shape[1], topology.U[1:]
    check_expert_parallel(E, topology.G)
    if placement is not None and placement.num_experts != E:
        raise ValueError(f"placement has {placement.num_experts} experts, routing map {E}")
    pairs = torch.zeros(topology.G, sum(groups), dtype=torch.int64, device=routing_map_TE.device)
    pairs[rank] = local_counts(routing_map_TE, topology, placement, dedup=False)
    ids_TK, _ = selected_slots(routing_map_TE, placement)
    flat = _raw_tables(ids_TK, E, groups, rank, topology.G)
    if z_method == "factored":
        return torch.cat([pairs.view(-1), flat])
    route = _tables_of(flat, E, groups, topology.G)[0]
    map_TS = routing_map_TE if placement is None else placement.to_slots(routing_map_TE).contiguous()
    return torch.cat([pairs.view(-1), route.reshape(-1)] + [z_four_case(map_TS, u).reshape(-1) for u in groups])


def stats_bytes(topology: Topology, num_experts: int) -> int:
    """Bytes of the vector every rank all-reduces per layer and plan ('factored' statistics): the
    per-origin pair counts and `_raw_tables` (route, co and the by-level pair table, spares
    included), int64."""
    G, D, E1 = topology.G, topology.D, num_experts + 1
    X = sum(topology.U[1:])
    X1 = X + D
    return 8 * (G * X + G * X1 + E1 * X1 + D * E1 * E1 + E1)


def _unflatten(flat: torch.Tensor, topology: Topology, E: int, z_method: str) -> SwapStats:
    """The `SwapStats` of a summed `local_swap_stats` vector (consumed: levels accumulate in place)."""
    G, groups = topology.G, topology.U[1:]
    pairs = RouteCounts.from_table(topology, flat[:G * sum(groups)].view(G, -1), dedup=False)
    flat = flat[G * sum(groups):]
    if z_method == "four_case":
        sizes = [G * sum(groups)] + [E * E * u for u in groups]
        route, *zs = flat.split(sizes)
        return SwapStats(RouteCounts.from_table(topology, route.view(G, -1), dedup=True), pairs,
                         z=tuple(z.view(E, E, u) for z, u in zip(zs, groups)))
    route, co, w = _tables_of(flat, E, groups, G)
    return SwapStats(RouteCounts.from_table(topology, route, dedup=True), pairs,
                     StackedLevels.from_tables(route.sum(0), co, w, groups))


def global_swap_stats(routing_maps: Sequence[torch.Tensor], topology: Topology, placement: ExpertPlacement | None,
                      z_method: str = "factored") -> SwapStats:
    """Sim tier: the global statistics from the routing maps of all G ranks (rank order). The
    four-case tables are sums over tokens, so all ranks' tokens go through `_raw_tables` at once;
    the per-origin counts come from `counts_from_slots` (equal to summing `local_swap_stats`)."""
    if len(routing_maps) != topology.G:
        raise ValueError(f"got routing maps of {len(routing_maps)} ranks; topology {topology.name!r} "
                         f"has G = {topology.G}")
    E = routing_maps[0].shape[1]
    if z_method != "factored":
        flat = sum(local_swap_stats(m, topology, placement, r, z_method) for r, m in enumerate(routing_maps))
        return _unflatten(flat, topology, E, z_method)
    check_expert_parallel(E, topology.G)
    ids_NK, _ = selected_slots(torch.cat(list(routing_maps)), placement)
    origin_N = torch.repeat_interleave(torch.arange(topology.G), torch.tensor([m.shape[0] for m in routing_maps]))
    return swap_stats_from_slots(ids_NK, origin_N, topology, E)


def swap_stats_from_slots(ids_NK: torch.Tensor, origin_N: torch.Tensor, topology: Topology, num_experts: int
                          ) -> SwapStats:
    """The global statistics from every token's sorted selected slots (`selected_slots`, padded with
    E) and its origin rank ('factored' tables)."""
    return swap_stats_from_tables(counts_from_slots(ids_NK, origin_N, topology, num_experts),
                                  swap_tables(ids_NK, num_experts, topology.U[1:]))


def swap_tables(ids_NK: torch.Tensor, num_experts: int, num_groups: Sequence[int]) -> torch.Tensor:
    """The four-case counts of tokens' sorted selected slots (`selected_slots`, padded with E), all
    tokens as one rank, as one flat int64 vector (`_raw_tables`). A sum over tokens: when some
    tokens' slots change (a swap moves the experts they select), the vector of the new slots is the
    old one minus those tokens' old vector plus their new one. `swap_stats_from_tables` reads it."""
    return _raw_tables(ids_NK, num_experts, num_groups, 0, 1)


def swap_stats_from_tables(counts: DispatchCounts, tables: torch.Tensor) -> SwapStats:
    """The global statistics from the per-origin counts and the `swap_tables` of the same tokens
    (`tables` left as it is)."""
    E, groups = counts.num_experts, counts.topology.U[1:]
    route, co, w = _tables_of(tables.clone(), E, groups, 1)
    return SwapStats(counts.copies, counts.pairs, StackedLevels.from_tables(route[0], co, w, groups))


def gather_swap_stats(comm: Comm, routing_map_TE: torch.Tensor, placement: ExpertPlacement | None,
                      z_method: str = "factored") -> SwapStats:
    """The global statistics on every rank: one all-reduce (sum). A collective.

    Devices: the rank's statistics are counted where the routing map lives and summed with
    `Comm.reduce_on_host`, which leaves them on the CPU, where `decide_swap` works on them (small
    tables; the same bits as a CPU run)."""
    flat = local_swap_stats(routing_map_TE, comm.topology, placement, comm.rank, z_method)
    return _unflatten(comm.reduce_on_host(flat, "sum"), comm.topology, routing_map_TE.shape[1], z_method)


# ==========================================================================================
# the objective and the choice
# ==========================================================================================
def _step_terms(topology: Topology, dim: int, profile: HardwareProfile):
    """(level L, per-sender scale U[P]/G, fan, alpha, beta) of each step of the HD`dim` route."""
    out = []
    for L, P in route_steps(topology, dim):
        model = profile.comm_model("a2a", step_name_of(topology, L, P))
        out.append((L, topology.U[P] / topology.G, topology.U[L] // topology.U[P], model.alpha_ms, model.beta_ms))
    return out


def swap_objective(counts_by_level: Mapping[int, torch.Tensor], topology: Topology, dim: int,
                   profile: HardwareProfile, row_bytes: int, max_fn: str = "smooth", gamma: float = 10.0
                   ) -> torch.Tensor:
    """Q_d (ms, Eq. (8)) of C placements from their global dedup group counts, int [C, U[L]] per
    level L the route uses; float64 [C]."""
    total = None
    for L, scale, fan, alpha, beta in _step_terms(topology, dim, profile):
        f = apply_max_fn(counts_by_level[L].to(torch.float64) * scale, max_fn, gamma)
        term = alpha + beta * (fan * row_bytes) * f
        total = term if total is None else total + term
    return total


def pair_objectives(stats: SwapStats, profile: HardwareProfile, row_bytes: int, dim: int, *,
                    max_fn: str = "smooth", gamma: float = 10.0, dtype: torch.dtype = torch.float64,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Q_d (ms, Eq. (8)) of swapping slot s1 with slot s2, for the slots s1 in `rows` [first, end)
    (default: all) and every s2: [end - first, E] in `dtype`, the pairs of slots on one GPU inf (a
    swap there changes nothing; Q of the current placement is `swap_objective` of z0). What
    `decide_swap` screens; also what tells which swaps lower Q (e.g. those between two nodes)."""
    _check_options(max_fn, gamma)
    topo = stats.topology
    E = stats.num_experts
    El = check_expert_parallel(E, topo.G)
    first, end = (0, E) if rows is None else rows
    terms = _step_terms(topo, dim, profile)
    n = end - first
    coef = [beta * fan * row_bytes for _, _, fan, _, beta in terms]
    if stats.tables is not None:
        f_LRS = stats.tables.pair_values([scale for _, scale, *_ in terms], max_fn, gamma, dtype,
                                         rows=(first, end), levels=[L - 1 for L, *_ in terms])
        q_RS = f_LRS.mul_(torch.tensor(coef, dtype=dtype).view(-1, 1, 1)).sum(0)
    else:
        q_RS = torch.zeros(n, E, dtype=dtype)
        for (L, scale, *_), c in zip(terms, coef):
            zs = stats.level(L)[first:end].reshape(n * E, -1).to(torch.float64) * scale
            q_RS.add_(apply_max_fn(zs, max_fn, gamma).view(n, E).to(dtype), alpha=c)
    q_RS += sum(alpha for _, _, _, alpha, _ in terms)
    gpu = torch.arange(first, end) // El
    q_RS.view(n, topo.G, El)[torch.arange(n), gpu] = math.inf              # pairs on one GPU change nothing
    return q_RS


@dataclass(frozen=True)
class SwapDecision:
    """One HierD-ES decision: swap logical experts `pair` (None: keep the placement)."""

    dim: int
    pair: tuple[int, int] | None
    q_current: float     # modeled ms of the current placement
    q_best: float        # modeled ms after the decision
    ties: int            # pairs within the tolerance of the best


def decide_swap(stats: SwapStats, placement: ExpertPlacement, profile: HardwareProfile, row_bytes: int, *,
                max_fn: str = "smooth", gamma: float = 10.0, dim: int | None = None,
                screen_dtype: torch.dtype = torch.float32, comm: Comm | None = None,
                weight_bytes: int = 4) -> SwapDecision:
    """Theorem 1 / Eq. (10) on global statistics: the pair (r, c) minimising Q_d, made only if it
    beats the current placement. Deterministic: every rank decides the same from the same stats.

    Two passes: the slot pairs are screened in `screen_dtype`; the pairs within a relative
    SCREEN_TOL of the screened minimum (a superset of the float64 ties) are evaluated again in
    float64 from their exact counts (`swap_objective`), and the tie rule is applied there.

    With `comm` (a collective) the pairs are split across the ranks: each screens the rows of its
    own GPU's slots (E / G x E pairs) and evaluates the candidates (r < c) of its rows; three small
    collectives (the screened minimum, the exact minimum, each rank's tie-break key) combine them.
    Without, one process takes all rows; both give the same decision. `stats` are CPU tables
    (`gather_swap_stats`); the scalars the collectives carry travel on the backend's device
    (`Comm.reduce_on_host`)."""
    _check_options(max_fn, gamma)
    topo = stats.topology
    check_profile(profile, topo)
    E = placement.num_experts
    El = check_expert_parallel(E, topo.G)
    d = choose_from_counts(stats.dispatch_counts, profile, row_bytes, weight_bytes) if dim is None else dim
    levels = [L for L, _ in route_steps(topo, d)]

    def exact_q(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:                  # float64 Q of swaps
        if stats.tables is not None:
            z = stats.tables.swapped_counts(s1, s2, [L - 1 for L in levels])
            rows = {L: z[i, :, :topo.U[L]] for i, L in enumerate(levels)}
        else:
            rows = {L: stats.level(L)[s1, s2] for L in levels}
        return swap_objective(rows, topo, d, profile, row_bytes, max_fn, gamma)

    if topo.G == 1:
        q_now = float(exact_q(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))[0])
        return SwapDecision(d, None, q_now, q_now, 0)
    first, end = (0, E) if comm is None else (comm.rank * El, (comm.rank + 1) * El)

    def reduce_min(value: float) -> float:
        return value if comm is None else float(comm.reduce_on_host(torch.tensor([value], dtype=torch.float64), "min"))

    q_RS = pair_objectives(stats, profile, row_bytes, d, max_fn=max_fn, gamma=gamma, dtype=screen_dtype,
                           rows=(first, end))
    n = end - first
    q_min = reduce_min(float(q_RS.min()))
    near = q_RS <= q_min + SCREEN_TOL * max(1.0, abs(q_min))
    i, s2 = (near & (torch.arange(E).view(1, E) > torch.arange(first, end).view(n, 1))).nonzero(as_tuple=True)
    s1 = i + first
    # the current placement (slot `first` swapped with itself) is evaluated with the candidates
    q_all = exact_q(torch.cat([s1.new_tensor([first]), s1]), torch.cat([s2.new_tensor([first]), s2]))
    q_now, q_C = float(q_all[0]), q_all[1:]
    q_best = reduce_min(float(q_C.min()) if q_C.numel() else math.inf)
    tied = q_C <= q_best + REL_TOL * max(1.0, abs(q_best))
    of_slot = torch.tensor(placement.expert_of_slot)
    r, c = torch.minimum(of_slot[s1], of_slot[s2]), torch.maximum(of_slot[s1], of_slot[s2])
    key_C = torch.where(tied, r * E + c, E * E)
    mine = torch.tensor([float(E * E), math.inf, float(tied.sum())], dtype=torch.float64)
    if q_C.numel():
        best = int(torch.argmin(key_C))
        mine[0], mine[1] = float(key_C[best]), float(q_C[best])
    every = mine.unsqueeze(0) if comm is None else comm.gather_on_host(mine)  # [ranks, (key, q, ties)]
    key, q_pair = (float(v) for v in every[int(torch.argmin(every[:, 0]))][:2])
    ties = int(every[:, 2].sum())
    if q_best < q_now - REL_TOL * max(1.0, abs(q_now)):
        return SwapDecision(d, (int(key) // E, int(key) % E), q_now, q_pair, ties)
    return SwapDecision(d, None, q_now, q_now, ties)


# ==========================================================================================
# the planner
# ==========================================================================================
@register("placement_planner", "hierd-es")
class HierDExpertSwap(PlacementPlanner):
    """HierD-ES: at every `every`-th iteration, swap the one pair of experts of this layer that
    most lowers the modeled HierD-AlltoAll time, from this iteration's routing of all ranks.

    profile: hardware profile (or its name) of the topology's shape; hidden, bytes_per_elem: the
    M and v of a token row; weight_bytes: bytes of a gate weight (the router's dtype, fp32), for
    d*'s model; max_fn 'max' | 'smooth' | 'lse', gamma for 'smooth'; dim: None = d* (Eq. (6),
    `impl.hiermoe.dimension`) on the current placement, or a fixed route dimension; z_method
    'factored' | 'four_case' (same result, see the module docstring)."""

    name = "hierd-es"

    def __init__(self, profile: HardwareProfile | str, hidden: int, bytes_per_elem: int = 2, *,
                 max_fn: str = "smooth", gamma: float = 10.0, dim: int | None = None, every: int = 1,
                 z_method: str = "factored", verify_agreement: bool = True, weight_bytes: int = 4):
        super().__init__(every)
        _check_options(max_fn, gamma, z_method)
        for key, value in (("hidden", hidden), ("bytes_per_elem", bytes_per_elem), ("weight_bytes", weight_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r} is not allowed; expected a positive integer")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim: {dim!r} is not allowed; expected None (d*) or a route dimension >= 1")
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.row_bytes, self.weight_bytes = hidden * bytes_per_elem, weight_bytes
        self.max_fn, self.gamma, self.dim, self.z_method = max_fn, float(gamma), dim, z_method
        self.verify_agreement = verify_agreement
        self.last_decision: SwapDecision | None = None

    def plan(self, comm: Comm, placement: ExpertPlacement, routing_map_TE: torch.Tensor) -> ExpertPlacement:
        check_profile(self.profile, comm.topology)
        if self.dim is not None and self.dim > comm.topology.D:
            raise ValueError(f"dim: {self.dim} is not available on topology {comm.topology.name!r}; "
                             f"allowed: 1..{comm.topology.D}")
        stats = gather_swap_stats(comm, routing_map_TE, placement, self.z_method)
        decision = decide_swap(stats, placement, self.profile, self.row_bytes, max_fn=self.max_fn,
                               gamma=self.gamma, dim=self.dim, comm=comm, weight_bytes=self.weight_bytes)
        if self.verify_agreement:
            pair = decision.pair or (-1, -1)
            top = comm.reduce_on_host(torch.tensor([pair[0], pair[1], -pair[0], -pair[1]]), "max")
            if not (int(top[0]) == -int(top[2]) == pair[0] and int(top[1]) == -int(top[3]) == pair[1]):
                raise RuntimeError(f"HierD-ES: ranks chose different swaps (rank {comm.rank}: {decision.pair})")
        self.last_decision = decision
        return placement.swap(*decision.pair) if decision.pair else placement
