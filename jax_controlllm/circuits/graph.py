"""The computational graph of a Llama for edge attribution: names, indices, valid edges, edge order.

Sources write into the residual stream, destinations read from it (before any normalisation):

    sources:       input | per block: a{l}.h{h} (one per query head), m{l}
    destinations:  per block: a{l}.h{h}<q>, <k>, <v> (each head reads a private copy), m{l} | logits

A Control LLM controlled block has two branches. The pretrained branch keeps the plain names (so its
nodes line up with the base model's), the expanded branch appends ``e``: ``a{l}e.h{h}``, ``m{l}e``. Inside a
block, a branch's MLP reads its own heads (unscaled); everything else reads the merged residual stream.

The order of sources and destinations, and the edge order used to break ties in top-n selection, follow the
reference implementation (see ``shared/reference/circuits/tiny_llama_mha/README.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

BRANCH_SUFFIX = ("", "e")      # pretrained/plain branch, expanded branch


@dataclass(frozen=True)
class BranchIndex:
    """Where one branch of one block lives in the source and destination lists."""
    number: int                 # position in Graph.branches
    block: int
    branch: int                 # 0 = plain / pretrained, 1 = expanded
    heads: slice                # its heads among the sources
    mlp: int                    # its MLP among the sources
    qkv: slice                  # its 3*H attention destinations (q heads, k heads, v heads)
    mlp_dst: int                # its MLP destination
    prefix: int                 # number of sources written before this block (readable by its attention)


@dataclass(frozen=True)
class Graph:
    """Nodes and edges for a model with ``n_heads`` query heads and the given block kinds."""
    n_heads: int
    block_kinds: tuple[str, ...]          # "llama" | "controlled", one per decoder block
    branches: tuple[BranchIndex, ...] = field(init=False, repr=False)
    sources: tuple[str, ...] = field(init=False, repr=False)
    destinations: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        h = self.n_heads
        sources, destinations, branches = ["input"], [], []
        for layer, kind in enumerate(self.block_kinds):
            if kind not in ("llama", "controlled"):
                raise ValueError(f"block {layer}: unknown kind {kind!r} (expected 'llama' or 'controlled')")
            prefix = len(sources)
            for branch in range(2 if kind == "controlled" else 1):
                tag = f"{layer}{BRANCH_SUFFIX[branch]}"
                first_src, first_dst = len(sources), len(destinations)
                sources += [f"a{tag}.h{i}" for i in range(h)] + [f"m{tag}"]
                destinations += [f"a{tag}.h{i}<{c}>" for c in "qkv" for i in range(h)] + [f"m{tag}"]
                branches.append(BranchIndex(len(branches), layer, branch, slice(first_src, first_src + h),
                                            first_src + h, slice(first_dst, first_dst + 3 * h), first_dst + 3 * h,
                                            prefix))
        destinations.append("logits")
        object.__setattr__(self, "sources", tuple(sources))
        object.__setattr__(self, "destinations", tuple(destinations))
        object.__setattr__(self, "branches", tuple(branches))

    # ------------------------------------------------------------------------------------------
    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_destinations(self) -> int:
        return len(self.destinations)

    @property
    def logits(self) -> int:
        """Index of the logits destination (the last one)."""
        return self.n_destinations - 1

    @property
    def n_layers(self) -> int:
        return len(self.block_kinds)

    def branches_of(self, block: int) -> tuple[BranchIndex, ...]:
        return tuple(b for b in self.branches if b.block == block)

    @cached_property
    def valid(self) -> np.ndarray:
        """[n_src, n_dst] bool: u -> v exists iff u is computed before v reads its input."""
        valid = np.zeros((self.n_sources, self.n_destinations), bool)
        for b in self.branches:
            valid[:b.prefix, b.qkv] = True
            valid[:b.prefix, b.mlp_dst] = True
            valid[b.heads, b.mlp_dst] = True
        valid[:, self.logits] = True
        return valid

    @cached_property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @cached_property
    def source_layer(self) -> np.ndarray:
        """[n_src] block index of each source (-1 for the input embedding)."""
        layer = np.full(self.n_sources, -1)
        for b in self.branches:
            layer[b.heads] = b.block
            layer[b.mlp] = b.block
        return layer

    @cached_property
    def destination_layer(self) -> np.ndarray:
        """[n_dst] block index of each destination (n_layers for logits)."""
        layer = np.full(self.n_destinations, self.n_layers)
        for b in self.branches:
            layer[b.qkv] = b.block
            layer[b.mlp_dst] = b.block
        return layer

    @cached_property
    def destination_node(self) -> np.ndarray:
        """[n_dst] the node each destination belongs to: a source index, or n_sources for logits."""
        node = np.full(self.n_destinations, self.n_sources)
        for b in self.branches:
            node[b.qkv] = np.tile(np.arange(b.heads.start, b.heads.stop), 3)
            node[b.mlp_dst] = b.mlp
        return node

    @property
    def node_names(self) -> tuple[str, ...]:
        """All nodes in the reference's order: the sources, then ``logits``."""
        return self.sources + ("logits",)

    @cached_property
    def is_head(self) -> np.ndarray:
        """[n_src] bool: the source is an attention head."""
        return np.array([".h" in name for name in self.sources])

    @cached_property
    def edge_order(self) -> np.ndarray:
        """[n_src, n_dst] int: each valid edge's position in the reference's edge insertion order
        (block by block; a branch's attention edges by source, head, then q/k/v; its MLP edges by source;
        finally the logits edges). Top-n selection breaks ties by this order, as a stable sort does."""
        h = self.n_heads
        order = np.full((self.n_sources, self.n_destinations), -1, dtype=np.int64)
        counter = 0
        for b in self.branches:
            # attention destinations: dst index = qkv.start + c*H + head; order by (src, head, c)
            src = np.arange(b.prefix)[:, None, None]
            head = np.arange(h)[None, :, None]
            letter = np.arange(3)[None, None, :]
            rank = counter + (src * h + head) * 3 + letter
            order[src, b.qkv.start + letter * h + head] = rank
            counter += b.prefix * h * 3
            mlp_sources = np.concatenate([np.arange(b.prefix), np.arange(b.heads.start, b.heads.stop)])
            order[mlp_sources, b.mlp_dst] = counter + np.arange(len(mlp_sources))
            counter += len(mlp_sources)
        order[:, self.logits] = counter + np.arange(self.n_sources)
        return order

    def edge_name(self, src: int, dst: int) -> str:
        return f"{self.sources[src]}->{self.destinations[dst]}"

    def source_index(self, name: str) -> int:
        try:
            return self.sources.index(name)
        except ValueError:
            raise KeyError(f"no source named {name!r}; sources look like 'input', 'a0.h1', 'm2', 'a3e.h0'") from None

    def destination_index(self, name: str) -> int:
        try:
            return self.destinations.index(name)
        except ValueError:
            raise KeyError(f"no destination named {name!r}; destinations look like 'a0.h1<q>', 'm2', "
                           f"'logits'") from None
