"""Training-step throughput of the Control LLM authors' release (linkedin/ControlLLM @ 7657b9f) on workload W1.

    python bench/peer_w1.py --checkout PATH --setting best      # Liger, no checkpointing, micro-batch 2
    python bench/peer_w1.py --checkout PATH --setting recipe    # Liger + checkpointing, micro-batch 4
    python bench/peer_w1.py --checkout PATH --tiny --steps 2 --warmup 1   # tiny shape, CPU smoke run

Runs in an environment of its own (torch, transformers 4.49.0, liger-kernel 0.5.6; see bench/README.md), never in
ours: nothing of the release is copied here. PATH is a checkout (or `git archive`) of the release; its
``src/controlllm/utils/model_expander.py`` is imported unchanged (its git blob id is checked) and builds the model.

What runs is the model the release trains after expansion: its ``register_expansion_classes`` on an expanded
config, ``AutoModelForCausalLM.from_config`` (random weights, sdpa attention, bf16), its ``freeze_layers`` and
``freeze_none_layers``; trainable weights are then fp32 masters and compute is bf16 autocast. The step is its
``compute_loss``: Hugging Face's loss + ``ModelExpander.get_additional_loss``, backward, clipping to 1.0 and a
fused AdamW (lr 5e-5, weight decay 0.01), one optimizer step per micro-batch. Liger kernels are applied with the
release's own ``triton_kernels.apply_model_customizations`` (rope, RMSNorm, SwiGLU, fused linear cross-entropy);
gradient checkpointing is the release's Trainer default (``gradient_checkpointing_enable``, non-reentrant).

Only import shims are added, for modules the training step never calls: vllm (not installed), sentence-transformers
and the package ``__init__`` files of ``controlllm``, ``controlllm.utils`` and ``controlllm.configs`` (they pull in
the release's logging, datasets and trainer setup).

Timing as W1 defines it (shared/reference/performance/peer_controlllm_h100.json): 3 warm-up and 10 timed steps,
each synchronised, tokens/s = micro-batch * seq_len / median step time. Prints one JSON row in the schema of
bench/train_step.py (FLOPs/token and MFU are added by bench/gpu_sweep.py, whose environment has our FLOP count).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from importlib import metadata
from pathlib import Path

import train_step  # bench/train_step.py: the W1 and tiny shapes live there (stdlib-only at import)

RELEASE = "linkedin/ControlLLM"
RELEASE_COMMIT = "7657b9f82188245f08142eccaed1fd68433ec3a4"
MODEL_EXPANDER_BLOB = "c5cf8ad698b426e19ce6b5079132508f6f1227a5"  # git blob id of model_expander.py at that commit
# W1's parameter counts as the H100 measurement of the release reported them.
W1_TRAINABLE, W1_TOTAL = 1744961536, 9775222792
SETTINGS = {
    "best": {"liger": True, "gradient_checkpointing": False, "batch": 2},   # the release's fastest on one H100
    "recipe": {"liger": True, "gradient_checkpointing": True, "batch": 4},    # its own training recipe
}
HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "rope_scaling")
# The expansion keys W1 sets; the tiny preset takes W1's for any it leaves out, so both run the same code path.
W1_EXPANSION = train_step.PRESETS["w1"]["expansion"]


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def package_stub(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]  # a package whose submodules load from the release's files
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def release_expander(checkout: Path) -> Path:
    """The release's model_expander.py in ``checkout``, checked to be the file of the pinned commit."""
    expander = checkout / "src" / "controlllm" / "utils" / "model_expander.py"
    if not expander.is_file():
        raise SystemExit(f"--checkout {checkout}: no src/controlllm/utils/model_expander.py there; pass a checkout "
                         f"of {RELEASE} at {RELEASE_COMMIT[:7]}")
    if git_blob_id(expander) != MODEL_EXPANDER_BLOB:
        raise SystemExit(f"--checkout {checkout}: model_expander.py differs from {RELEASE}@{RELEASE_COMMIT[:7]} "
                         f"(git blob {git_blob_id(expander)[:12]}, expected {MODEL_EXPANDER_BLOB[:12]})")
    return expander


def import_release(checkout: Path):
    """Import the release's ModelExpander unchanged (``checkout`` already checked by release_expander)."""
    package = checkout / "src" / "controlllm"
    package_stub("controlllm", package)
    package_stub("controlllm.utils", package / "utils")
    package_stub("controlllm.configs", package / "configs")
    package_stub("controlllm.utils.custom_sentence_transformers",
                 CustomSentenceTransformer=type("CustomSentenceTransformer", (), {}))
    package_stub("sentence_transformers")
    package_stub("sentence_transformers.util", is_sentence_transformer_model=lambda *a, **k: False)
    # vllm: only its inference paths use these names (annotations and a cache hook defined at import)
    package_stub("vllm", Path(), ModelRegistry=types.SimpleNamespace(register_model=lambda *a, **k: None))
    package_stub("vllm.attention", AttentionMetadata=type("AttentionMetadata", (), {}))
    package_stub("vllm.sequence", IntermediateTensors=type("IntermediateTensors", (), {}))
    package_stub("vllm.distributed", get_pp_group=None)
    package_stub("vllm.utils", is_pin_memory_available=None)
    from controlllm.utils.model_expander import ModelExpander
    return ModelExpander


def expansion_config(preset: dict, base_dir: Path) -> dict:
    """The ``expansion`` block the release writes into an expanded model's config.json."""
    expansion = {**W1_EXPANSION, **preset["expansion"]}
    n_layers, n_exp = preset["model"]["num_hidden_layers"], expansion["num_exp_layers"]
    split = max(n_layers // n_exp, 1)  # expand_layers_concat's rule: a side car after every split-th layer
    return {"expand_type": expansion["expand_type"], "merge_method": expansion["merge_method"],
            "freezed_layers": [i for i in range(n_layers) if (i + 1) % split != 0],
            "expanded_from": str(base_dir), "num_ori_layers": n_layers, "num_exp_layers": n_exp,
            "interpolation_factor": expansion["interpolation_factor"],
            "interpolation_loss_alpha": expansion["interpolation_loss_alpha"],
            "interpolation_loss_type": expansion["interpolation_loss_type"], "interpolation_norm_alpha": 0,
            "freeze_interpolation_factor": expansion["freeze_interpolation_factor"],
            "freeze_ori_layers": True, "freeze_ori_non_layers": True}


def write_configs(preset: dict, root: Path) -> Path:
    """A base Llama config and the expanded config that names it (config files only: the weights are random)."""
    from transformers import LlamaConfig

    fields = {k: preset["model"][k] for k in HF_FIELDS if k in preset["model"]}
    base_dir, expanded_dir = root / "base", root / "expanded"
    base = LlamaConfig(**fields, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    base.save_pretrained(base_dir)
    expanded = {**base.to_dict(), "architectures": ["LlamaForCausalLMExpansion"], "model_type": "causallmexpansion",
                "expansion": expansion_config(preset, base_dir)}
    expanded_dir.mkdir()
    (expanded_dir / "config.json").write_text(json.dumps(expanded, indent=1))
    return expanded_dir


def build_model(ModelExpander, expanded_dir: Path, device, gradient_checkpointing: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ModelExpander.register_expansion_classes(str(expanded_dir))
    config = AutoConfig.from_pretrained(expanded_dir)
    with device:
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    ModelExpander.freeze_layers(model, str(expanded_dir))
    ModelExpander.freeze_none_layers(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 masters for the trainable weights; frozen ones stay bf16
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def versions() -> dict:
    import torch
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("transformers", "liger-kernel", "triton", "tokenizers", "huggingface-hub", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def measure(args) -> dict:
    import torch

    setting = dict(SETTINGS[args.setting])
    if args.batch:
        setting["batch"] = args.batch
    on_gpu = torch.cuda.is_available()
    if args.tiny or not on_gpu:
        setting["liger"] = False  # Liger's kernels are Triton GPU kernels
    preset_name = "smoke" if args.tiny else "w1"
    preset = train_step.PRESETS[preset_name]
    device = torch.device("cuda" if on_gpu else "cpu")
    t0 = time.perf_counter()
    ModelExpander = import_release(Path(args.checkout))
    if setting["liger"]:
        from controlllm.utils.triton_kernels import apply_model_customizations
        apply_model_customizations()  # patches the Llama classes before the expanded classes derive from them
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(ModelExpander, write_configs(preset, Path(tmp)), device,
                            setting["gradient_checkpointing"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.01, fused=on_gpu)
    seq, batch = preset["seq_len"], setting["batch"]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, preset["model"]["vocab_size"], (batch, seq), generator=generator).to(device)
               for _ in range(2)]

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def step(ids):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            cross_entropy = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss = cross_entropy + ModelExpander.get_additional_loss(model, cross_entropy)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync()
    setup_s = time.perf_counter() - t0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = float(step(batches[i % 2]).detach())  # synchronises
        sync()
        elapsed = time.perf_counter() - start
        if i == 0:
            first_step = elapsed
        if i >= args.warmup:
            times.append(elapsed)
            losses.append(loss)
    step_s = statistics.median(times)
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    return {
        "preset": preset_name, "setting": args.setting, "batch": batch, "seq_len": seq, "role": "peer",
        "precision": "bf16", "liger": setting["liger"], "gradient_checkpointing": model.is_gradient_checkpointing,
        "attention": model.config._attn_implementation, "tokens_per_s": round(batch * seq / step_s, 1),
        "step_s_median": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times], "first_step_s": round(first_step, 2),
        "setup_s": round(setup_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if on_gpu else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if on_gpu else None,
        "loss_first_last": [losses[0], losses[-1]], "trainable_params": n_trainable, "total_params": n_total,
        "matches_w1_param_counts": (n_trainable, n_total) == (W1_TRAINABLE, W1_TOTAL) if not args.tiny else None,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "platform": "gpu" if on_gpu else "cpu",
        "release": {"repo": RELEASE, "commit": RELEASE_COMMIT,
                    "model_expander": str(release_expander(Path(args.checkout))),
                    "model_expander_blob": MODEL_EXPANDER_BLOB},
        "versions": versions(), "command": "python " + " ".join(sys.argv),
    }


def count_params(args) -> dict:
    """The release's expanded model of the preset built on the meta device (no memory, no step): its parameter
    counts, which for W1 must be those the H100 measurement reported."""
    import torch

    ModelExpander = import_release(Path(args.checkout))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(ModelExpander, write_configs(train_step.PRESETS["smoke" if args.tiny else "w1"],
                                                         Path(tmp)), torch.device("meta"), False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"preset": "smoke" if args.tiny else "w1", "trainable_params": trainable, "total_params": total,
            "matches_w1_param_counts": (trainable, total) == (W1_TRAINABLE, W1_TOTAL)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", required=True, help=f"a checkout of {RELEASE} at {RELEASE_COMMIT[:7]}")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="best")
    p.add_argument("--batch", type=int, default=0, help="override the setting's micro-batch")
    p.add_argument("--tiny", action="store_true", help="bench/train_step.py's smoke shape, Liger off (CPU smoke)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--count-params", action="store_true",
                   help="only build the model on the meta device and print its parameter counts")
    args = p.parse_args(argv)
    release_expander(Path(args.checkout))  # before torch loads: a wrong path fails in a second
    print(json.dumps(count_params(args) if args.count_params else measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
