"""What each destination reads: three readers for the graph forward pass (nodes.run).

A reader has three methods, called as the forward pass reaches each destination group:

    attention(branch, resid, groups) -> [B, T, D] (shared), [3, H, B, T, D] (private per q/k/v and head)
                                         or a ``taps.TappedInput``
    mlp(branch, resid_mid, heads, groups, bias) -> [B, T, D]   heads: this branch's heads [H, B, T, D] as
                                                               computed; bias: its attention output bias
    logits(resid, groups) -> [B, T, D]

``groups`` are the source outputs as this destination reads them (``RunOutput.reads[block]``): the input,
then one [n, B, T, D] group per earlier block; concatenated, they are the destination's prefix of sources.

- ``PlainReader``: the residual stream itself (an ordinary forward pass).
- ``TapReader``: the residual stream plus a zero-valued tap per destination, ``x_v + sum_u c[u,v] delta_u``
  at c = 0, whose gradient with respect to c is exactly the attribution score sum_{b,t,d} delta_u dL/dx_v
  (taps.py). The scores come out of one backward pass, contracted per destination group: no per-edge loop.
- ``PatchReader``: edge-level patching, ``x_v = sum_u M[u,v] a_u(current) + (1 - M[u,v]) a_u(reference)``,
  where the reference is a corrupted run (faithfulness) or zero (ablation, Hit@k).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_controlllm.circuits.graph import BranchIndex, Graph
from jax_controlllm.circuits.nodes import RunOutput
from jax_controlllm.circuits.taps import TappedInput, tap


class PlainReader:
    def attention(self, branch: BranchIndex, resid, groups):
        return resid

    def mlp(self, branch: BranchIndex, resid_mid, heads, groups, bias):
        return resid_mid

    def logits(self, resid, groups):
        return resid


# ----------------------------------------------------------------------------------------------
# Attribution taps
# ----------------------------------------------------------------------------------------------

def tap_coefficients(graph: Graph) -> dict:
    """Zero coefficients, one array per destination group; their gradient is the score matrix in pieces."""
    coeffs = {"logits": jnp.zeros((graph.n_sources, 1), jnp.float32)}
    for b in graph.branches:
        coeffs[f"attn{b.number}"] = jnp.zeros((b.prefix, 3 * graph.n_heads), jnp.float32)
        coeffs[f"mlp{b.number}"] = jnp.zeros((b.prefix, 1), jnp.float32)
        coeffs[f"intra{b.number}"] = jnp.zeros((graph.n_heads, 1), jnp.float32)
    return coeffs


def assemble_scores(graph: Graph, pieces: dict) -> jax.Array:
    """Gradients of ``tap_coefficients`` -> the [n_src, n_dst] score matrix (0 off the valid mask)."""
    scores = jnp.zeros((graph.n_sources, graph.n_destinations), jnp.float32)
    for b in graph.branches:
        scores = scores.at[:b.prefix, b.qkv].set(pieces[f"attn{b.number}"])
        scores = scores.at[:b.prefix, b.mlp_dst].set(pieces[f"mlp{b.number}"][:, 0])
        scores = scores.at[b.heads, b.mlp_dst].set(pieces[f"intra{b.number}"][:, 0])
    return scores.at[:, graph.logits].set(pieces["logits"][:, 0])


def tap_deltas(corrupted: RunOutput, clean: RunOutput) -> RunOutput:
    """delta = corrupted - clean for the node outputs the taps contract with. A group read unchanged by
    several blocks is one buffer, and so is its difference (each is computed once)."""
    cache = {}

    def diff(c, k):
        key = (id(c), id(k))
        if key not in cache:
            cache[key] = c - k
        return cache[key]

    reads = tuple(tuple(diff(c, k) for c, k in zip(cr, kr)) for cr, kr in zip(corrupted.reads, clean.reads))
    raw = {n: corrupted.raw_heads[n] - clean.raw_heads[n] for n in clean.raw_heads}
    return RunOutput(reads, raw, {}, clean.resid, [])


class TapReader:
    """Residual stream + zero taps (taps.py); ``delta`` from ``tap_deltas``. A tap in block l contracts with
    the deltas of the groups block l reads, which together are exactly its prefix of sources."""

    def __init__(self, graph: Graph, coeffs: dict, delta: RunOutput):
        self.graph, self.coeffs, self.delta = graph, coeffs, delta

    def attention(self, branch, resid, groups):
        return TappedInput(resid, self.coeffs[f"attn{branch.number}"], self.delta.reads[branch.block])

    def mlp(self, branch, resid_mid, heads, groups, bias):
        x = tap(resid_mid[None], self.coeffs[f"mlp{branch.number}"], self.delta.reads[branch.block])
        return tap(x, self.coeffs[f"intra{branch.number}"], (self.delta.raw_heads[branch.number],))[0]

    def logits(self, resid, groups):
        return tap(resid[None], self.coeffs["logits"], self.delta.reads[-1])[0]


# ----------------------------------------------------------------------------------------------
# Edge patching
# ----------------------------------------------------------------------------------------------

class PatchReader:
    """Edges with ``keep[u, v] = 1`` carry the current run's source output, the others the reference run's
    (``reference=None``: zero, i.e. ablated). The reference must hold the same merge coefficients."""

    def __init__(self, graph: Graph, keep: jax.Array, reference: Optional[RunOutput]):
        self.graph, self.keep, self.reference = graph, keep, reference

    @staticmethod
    def _mix(current, keep, reference):
        """sources [S, B, T, D] x keep [S, V] -> inputs [V, B, T, D]."""
        x = jnp.einsum("sbtd,sv->vbtd", current, keep.astype(current.dtype))
        if reference is not None:
            x = x + jnp.einsum("sbtd,sv->vbtd", reference, (1 - keep).astype(reference.dtype))
        return x

    def _read(self, groups, index, dst, bias=None):
        """What destinations ``dst`` read from the sources of ``groups`` (the reference's ``reads[index]``);
        ``bias``: a constant the input node carries for them (a branch's own attention output bias)."""
        current = jnp.concatenate(groups, axis=0)
        reference = None if self.reference is None else jnp.concatenate(self.reference.reads[index], axis=0)
        if bias is not None:
            current = current.at[0].add(bias)
            reference = None if reference is None else reference.at[0].add(bias)
        return self._mix(current, self.keep[:current.shape[0], dst], reference)

    def attention(self, branch, resid, groups):
        x = self._read(groups, branch.block, branch.qkv)
        return x.reshape((3, self.graph.n_heads) + x.shape[1:])

    def mlp(self, branch, resid_mid, heads, groups, bias):
        dst = slice(branch.mlp_dst, branch.mlp_dst + 1)
        reference = None if self.reference is None else self.reference.raw_heads[branch.number]
        x = self._read(groups, branch.block, dst, bias) + self._mix(heads, self.keep[branch.heads, dst], reference)
        return x[0]

    def logits(self, resid, groups):
        return self._read(groups, -1, slice(self.graph.logits, None))[0]
