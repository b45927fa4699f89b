"""What each destination reads: three readers for the graph forward pass (forward.run).

A reader has four methods, called as the forward pass reaches each destination group:

    attention(branch, resid, chunks) -> [B, T, D] (shared) or [3, H, B, T, D] (private per q/k/v and head)
    mlp(branch, resid_mid, heads, chunks) -> [B, T, D]      heads: this branch's unscaled heads [H, B, T, D]
    logits(resid, chunks) -> [B, T, D]
    gate(w) -> w                                             the controlled-block merge weight

``chunks`` are the folded source outputs computed so far, source-major [k, B, T, D] each (concatenated in
order they are the first sources of the graph).

- ``PlainReader``: the residual stream itself (an ordinary forward pass).
- ``TapReader``: the residual stream plus a zero-valued tap per destination, ``x_v + sum_u c[u,v] delta_u``
  at c = 0, whose gradient with respect to c is exactly the attribution score sum_{b,t,d} delta_u dL/dx_v
  (taps.py). The scores come out of one backward pass, contracted per destination group: no per-edge loop.
  Its ``attention`` returns a ``TappedInput`` (the shared residual + the tap), not an array.
- ``PatchReader``: edge-level patching, ``x_v = sum_u M[u,v] a_u(current) + (1 - M[u,v]) a_u(reference)``,
  where the reference is a corrupted run (faithfulness) or zero (ablation, Hit@k).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_controlllm.circuits.forward import RunOutput
from jax_controlllm.circuits.graph import BranchIndex, Graph
from jax_controlllm.circuits.taps import TappedInput, tap


class PlainReader:
    def attention(self, branch: BranchIndex, resid, chunks):
        return resid

    def mlp(self, branch: BranchIndex, resid_mid, heads, chunks):
        return resid_mid

    def logits(self, resid, chunks):
        return resid

    def gate(self, w):
        return w


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


def branch_heads(run: RunOutput, branch: BranchIndex) -> jax.Array:
    """A branch's unscaled heads [H, B, T, D]: as stored for controlled blocks, else the source slice."""
    if branch.number in run.raw_heads:
        return run.raw_heads[branch.number]
    return run.groups[1 + branch.block][:branch.heads.stop - branch.heads.start]


def tap_deltas(graph: Graph, delta: RunOutput) -> tuple[tuple, dict]:
    """The corrupted-minus-clean differences the taps contract with: the source groups (input, then one per
    block, [n, B, T, D] each) and the unscaled heads of controlled-block branches [H, B, T, D]."""
    return tuple(delta.groups), dict(delta.raw_heads)


class TapReader:
    """Residual stream + zero taps (taps.py); ``deltas`` from ``tap_deltas``. A tap in block l contracts with
    the groups of the input and blocks < l, which together are exactly its prefix of sources."""

    def __init__(self, graph: Graph, coeffs: dict, deltas: tuple[tuple, dict]):
        self.graph, self.coeffs = graph, coeffs
        self.groups, self.raw_heads = deltas

    def attention(self, branch, resid, chunks):
        return TappedInput(resid, self.coeffs[f"attn{branch.number}"], self.groups[:1 + branch.block])

    def mlp(self, branch, resid_mid, heads, chunks):
        x = tap(resid_mid[None], self.coeffs[f"mlp{branch.number}"], self.groups[:1 + branch.block])
        # its own heads: unscaled (stored apart) in a controlled block, the block group's first H otherwise
        own = (self.raw_heads[branch.number] if branch.number in self.raw_heads
               else self.groups[1 + branch.block][:self.graph.n_heads])
        return tap(x, self.coeffs[f"intra{branch.number}"], (own,))[0]

    def logits(self, resid, chunks):
        return tap(resid[None], self.coeffs["logits"], self.groups)[0]

    def gate(self, w):
        return jax.lax.stop_gradient(w)


# ----------------------------------------------------------------------------------------------
# Edge patching
# ----------------------------------------------------------------------------------------------

class PatchReader:
    """Edges with ``keep[u, v] = 1`` carry the current run's source output, the others the reference run's
    (``reference=None``: zero, i.e. ablated)."""

    def __init__(self, graph: Graph, keep: jax.Array, reference: Optional[RunOutput]):
        self.graph, self.keep, self.reference = graph, keep, reference

    def _mix(self, current, keep, reference):
        """sources [S, B, T, D] x keep [S, V] -> inputs [V, B, T, D]."""
        x = jnp.einsum("sbtd,sv->vbtd", current, keep.astype(current.dtype))
        if reference is not None:
            x = x + jnp.einsum("sbtd,sv->vbtd", reference, (1 - keep).astype(reference.dtype))
        return x

    def _prefix(self, chunks, count, dst):
        current = jnp.concatenate(chunks, axis=0)[:count]
        reference = None if self.reference is None else self.reference.sources[:count]
        return self._mix(current, self.keep[:count, dst], reference)

    def attention(self, branch, resid, chunks):
        x = self._prefix(chunks, branch.prefix, branch.qkv)
        return x.reshape((3, self.graph.n_heads) + x.shape[1:])

    def mlp(self, branch, resid_mid, heads, chunks):
        dst = slice(branch.mlp_dst, branch.mlp_dst + 1)
        reference = None if self.reference is None else branch_heads(self.reference, branch)
        x = self._prefix(chunks, branch.prefix, dst) + self._mix(heads, self.keep[branch.heads, dst], reference)
        return x[0]

    def logits(self, resid, chunks):
        return self._prefix(chunks, self.graph.n_sources, slice(self.graph.logits, None))[0]

    def gate(self, w):
        return w
