"""Which decoder blocks a model has, and how they are grouped for ``lax.scan``.

A model is a sequence of *blocks*: a plain Llama decoder layer ("llama") or a Control LLM controlled
layer ("controlled": a frozen pretrained layer, a trainable expanded copy and a merge module). Each block
is also frozen or trainable. Blocks with the same (kind, trainable) key have identical parameter shapes, so
a repeating pattern of keys — e.g. 3 frozen plain + 1 controlled for 32 layers with every 4th controlled —
becomes one *block group* scanned 8 times over a 4-block body. Compile time then does not grow with depth.
("Segment" means one packed document only: ``segment_ids``.)

The layout is a pure function of the (frozen, hashable) ModelConfig, computed once per config and cached.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from jax_controlllm.config import ConfigError, ModelConfig, selected_layers


@dataclass(frozen=True)
class Block:
    kind: str            # "llama" | "controlled"
    trainable: bool      # plain layers only: does the whole layer train? (controlled: see trainable_mask)
    origin: int          # index of the original (pre-expansion) layer it came from

    @property
    def key(self) -> tuple[str, bool]:
        return (self.kind, self.trainable)


@dataclass(frozen=True)
class BlockGroup:
    start: int                   # index of the first block
    pattern: tuple[Block, ...]   # the blocks of one scan step (their keys repeat)
    repeats: int

    @property
    def size(self) -> int:
        return len(self.pattern) * self.repeats

    def block_index(self, repeat: int, position: int) -> int:
        return self.start + repeat * len(self.pattern) + position


@functools.lru_cache(maxsize=256)
def layer_plan(config: ModelConfig) -> tuple[Block, ...]:
    """The blocks of ``config`` in order (length = config.num_hidden_layers)."""
    exp = config.expansion
    if exp is None:
        train = set(config.trainable_layers or ())
        return tuple(Block("llama", i in train, i) for i in range(config.num_hidden_layers))
    num_ori = exp.num_ori_layers if exp.num_ori_layers is not None else config.num_hidden_layers
    chosen = selected_layers(exp, num_ori)
    ori_trainable = not exp.freeze_ori_layers
    blocks: list[Block] = []
    for i in range(num_ori):
        if i not in chosen:
            blocks.append(Block("llama", ori_trainable, i))
            continue
        rank = chosen.index(i)
        kind = exp.expand_type if exp.expand_type != "hybrid" else ("stack" if rank % 2 == 0 else "concat")
        if kind == "concat":
            blocks.append(Block("controlled", False, i))
        else:  # stack: keep the original, insert a trainable copy right after it
            blocks.append(Block("llama", ori_trainable, i))
            blocks.append(Block("llama", True, i))
    if len(blocks) != config.num_hidden_layers:
        raise ConfigError(f"model.num_hidden_layers is {config.num_hidden_layers} but the expansion "
                          f"({exp.expand_type}, {len(chosen)} of {num_ori} layers) gives {len(blocks)} blocks")
    return tuple(blocks)


def group_blocks(plan: tuple[Block, ...], scan: bool = True) -> list[BlockGroup]:
    """Cover the plan with repeated patterns, minimising the number of distinct block bodies to compile
    (the sum of pattern lengths), then the number of groups. A plain 32-layer model is one group of
    1 block x 32; 32 layers with every 4th controlled is one group of 4 blocks x 8."""
    n = len(plan)
    if not scan:
        return [BlockGroup(i, (b,), 1) for i, b in enumerate(plan)]
    keys = [b.key for b in plan]
    best: list[tuple[int, int]] = [(0, 0)] * (n + 1)   # (compiled blocks, groups) to cover plan[s:]
    choice: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    for s in range(n - 1, -1, -1):
        best[s] = (n + 1, n + 1)
        for p in range(1, n - s + 1):
            r = 1
            while True:
                cost = (p + best[s + r * p][0], 1 + best[s + r * p][1])
                if cost < best[s]:
                    best[s], choice[s] = cost, (p, r)
                nxt = s + (r + 1) * p
                if nxt > n or keys[s + r * p:nxt] != keys[s:s + p]:
                    break
                r += 1
    out, s = [], 0
    while s < n:
        p, r = choice[s]
        out.append(BlockGroup(s, tuple(plan[s:s + p]), r))
        s += p * r
    return out


def controlled_indices(config: ModelConfig) -> list[int]:
    return [i for i, b in enumerate(layer_plan(config)) if b.kind == "controlled"]


@functools.lru_cache(maxsize=256)
def block_groups(config: ModelConfig) -> tuple[BlockGroup, ...]:
    """Block groups of the model. The frozen prefix below the first trainable block gets groups of its own:
    nothing there needs a backward pass, and a scan body shared with trainable blocks would run one."""
    plan = layer_plan(config)
    first = first_trainable_block(config)
    if not first:
        return tuple(group_blocks(plan, scan=config.scan_layers))
    head = group_blocks(plan[:first], scan=config.scan_layers)
    tail = group_blocks(plan[first:], scan=config.scan_layers)
    return tuple(head + [BlockGroup(s.start + first, s.pattern, s.repeats) for s in tail])


def first_trainable_block(config: ModelConfig) -> Optional[int]:
    for i, b in enumerate(layer_plan(config)):
        if b.trainable or b.kind == "controlled":
            return i
    return None
