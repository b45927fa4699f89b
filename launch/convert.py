"""Convert between our checkpoints, Hugging Face directories and GGUF files.

    python -m launch.convert orbax-to-hf --ckpt runs/demo --out exports/demo-hf [--merge-back] [--format release|plain]
    python -m launch.convert hf-to-orbax --hf path/to/hf --out exports/model
    python -m launch.convert gguf-to-hf  --gguf model.gguf --out path/to/hf      (--gguf smollm2: the bundled model)

orbax-to-hf writes a plain Llama (LlamaForCausalLM), the Control LLM release's format for expanded models
(CausalLMExpansion), or with --merge-back an expanded model folded into a plain Llama. Tokenizer files are
copied alongside. Every export is reloaded and its logits compared with ours on a sample before the command
reports success; a merge-back also reports how far the merged model drifts from the unmerged one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from launch.generate import one_line_errors


class ExportError(ValueError):
    """A conversion cannot run or its check failed; the message says why and what to do."""


class Stages:
    """Numbered progress lines with timings on stderr: conversions of big models take minutes."""

    def __init__(self, total: int):
        self.total, self.index, self.started = total, 0, time.perf_counter()

    def __call__(self, what: str) -> "Stages":
        self.index += 1
        self.what, self.t0 = what, time.perf_counter()
        print(f"[{self.index}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        return self

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            print(f"      done in {time.perf_counter() - self.t0:.1f}s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Checks shared by the commands
# ----------------------------------------------------------------------------------------------

def _check_out(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not overwrite:
        raise ExportError(f"--out {path} already exists; remove it, choose another directory or pass --overwrite")
    return path


def _kind_of(path: str, flag: str) -> str:
    """hf | gguf | smollm2 | orbax, or "unknown" for a directory that is none of them at first sight."""
    from jax_controlllm.config import ConfigError
    from jax_controlllm.convert.auto import detect_format
    try:
        return detect_format(path, flag)
    except ConfigError:
        if Path(path).is_dir():
            return "unknown"
        raise


def _require_kind(path: str, flag: str, wanted: str) -> None:
    """A clear error when the input is another kind of model than the command converts."""
    kind = _kind_of(path, flag)
    if kind == wanted or (wanted == "gguf" and kind == "smollm2") or (wanted == "orbax" and kind == "unknown"):
        return   # a step directory looks "unknown" here; load_model says precisely what is missing
    names = {"hf": "a Hugging Face directory", "gguf": "a GGUF file", "smollm2": "the bundled SmolLM2 GGUF",
             "orbax": "one of our (Orbax) checkpoints",
             "unknown": "a directory without a model (no config.json + *.safetensors)"}
    if kind == "unknown":
        raise ExportError(f"{flag} {path} is {names[kind]}; expected {names[wanted]}")
    use = {"hf": "hf-to-orbax --hf", "gguf": "gguf-to-hf --gguf", "smollm2": "gguf-to-hf --gguf",
           "orbax": "orbax-to-hf --ckpt"}
    raise ExportError(f"{flag} {path} is {names[kind]}, not {names[wanted]}; convert it with "
                      f"`python -m launch.convert {use[kind]} {path} --out DIR`")


def sample_ids(vocab_size: int, max_positions: int, seed: int = 0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab_size, size=(2, min(32, max_positions)), dtype=np.int32)


def logit_gap(config_a, params_a, config_b, params_b, ids) -> float:
    """Largest absolute logit difference between two models on ``ids``."""
    import numpy as np

    from jax_controlllm.model import forward
    a, b = np.asarray(forward(config_a, params_a, ids)), np.asarray(forward(config_b, params_b, ids))
    return float(np.max(np.abs(a - b)))


def _as_saved(params, dtype: Optional[str]):
    """Our params as the export stores them (rounded to ``dtype``), in float32 for comparison."""
    import jax
    import jax.numpy as jnp
    if dtype is None:
        return params
    return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype).astype(jnp.float32), params)


def _check_logits(gap: float, atol: float, out: Path, what: str) -> None:
    print(f"      max |logit difference| {what}: {gap:.3g} (tolerance {atol:g})", file=sys.stderr)
    if not gap <= atol:
        raise ExportError(f"export check failed: the logits of {out} differ from ours by {gap:.3g} (> {atol:g}); "
                          f"the export is not trustworthy; please report this with the checkpoint's config")


# ----------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------

def _tokenizer_for(model: str, explicit: Optional[str]):
    from jax_controlllm.tokenizer import TokenizerError, tokenizer_source_for
    try:
        return tokenizer_source_for(model, explicit)
    except TokenizerError:
        return None


def _write_tokenizer(model: str, explicit: Optional[str], out: Path) -> None:
    source = _tokenizer_for(model, explicit)
    if source is None:
        print(f"      warning: no tokenizer found in or beside {model}; the export has weights only "
              f"(pass --tokenizer DIR|FILE.gguf|smollm2 to include one)", file=sys.stderr)
        return
    from jax_controlllm.tokenizer import write_tokenizer
    copied = write_tokenizer(source, out)
    print(f"      tokenizer from {source}: {', '.join(copied) or 'no files'}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def orbax_to_hf(ckpt: str, out: str, merge_back: bool = False, format: Optional[str] = None,
                tokenizer: Optional[str] = None, dtype: Optional[str] = None, overwrite: bool = False,
                atol: float = 1e-4, expanded_from: Optional[str] = None) -> dict:
    """Export one of our checkpoints as a Hugging Face directory, checked against our logits. Returns a report."""
    from jax_controlllm.convert import merge_back as folding  # the flag of the same name is a bool here
    from jax_controlllm.convert.hf import load_hf, save_hf, save_hf_tensors
    from jax_controlllm.model.layout import controlled_indices

    out_dir = _check_out(out, overwrite)
    _require_kind(ckpt, "--ckpt", "orbax")
    if merge_back and format == "release":
        raise ExportError("--merge-back writes a plain Llama; drop --format release (or drop --merge-back)")
    stages = Stages(3)
    with stages(f"loading {ckpt}"):
        config, params = _load_checkpoint(ckpt)
    controlled = controlled_indices(config)
    if merge_back and config.expansion is None:
        raise ExportError(f"--ckpt {ckpt} is a plain Llama; there is nothing to merge back: drop --merge-back")
    if format == "plain" and controlled and not merge_back:
        raise ExportError(f"--ckpt {ckpt} has controlled (expanded) layers {controlled}, which a plain Llama cannot "
                          "hold; add --merge-back to fold them in (approximate, the drift is reported) or use "
                          "--format release")
    report: dict = {"ckpt": str(ckpt), "out": str(out_dir), "merge_back": merge_back}
    ids = sample_ids(config.vocab_size, config.max_position_embeddings)
    with stages("writing " + ("merged-back plain Llama" if merge_back else
                              "Control LLM release format" if controlled else "plain Llama")):
        reference_config, reference = config, params
        if merge_back:      # the export must then reproduce the merged model
            merged = folding.merge_back(config, params, sample_ids=ids)
            reference_config, reference = merged.config, merged.params
            report.update(save_hf_tensors(merged.config, merged.tensors, out_dir, dtype=dtype,
                                          expansion_provenance=folding.provenance(config)))
            report.update(merged.report)
        else:
            report.update(save_hf(config, params, out_dir, dtype=dtype, expanded_from=expanded_from))
        _write_tokenizer(ckpt, tokenizer, out_dir)
    with stages("reloading the export and comparing logits"):
        exported_config, exported = load_hf(out_dir, dtype="float32")
        reference_config = _float32(reference_config)
        gap = logit_gap(reference_config, _as_saved(reference, dtype), exported_config, exported, ids)
        report["max_abs_logit_error"] = gap
        _check_logits(gap, atol, out_dir, "export vs ours" + (" (merged)" if merge_back else ""))
    if merge_back:
        print(f"merge-back drift from the unmerged model: max |logit| {report['max_abs_logit_drift']:.3g}, "
              f"mean {report['mean_abs_logit_drift']:.3g}, argmax agreement {report['argmax_agreement']:.1%}",
              file=sys.stderr)
    return report


def _load_checkpoint(ckpt: str):
    """load_model, with its errors about the path naming the flag it came from."""
    from jax_controlllm.checkpoint import load_model
    from jax_controlllm.config import ConfigError
    try:
        return load_model(ckpt)
    except ConfigError as err:
        raise ExportError(f"--ckpt {err}") from None


def _float32(config):
    import dataclasses
    return dataclasses.replace(config, param_dtype="float32", frozen_dtype="float32", compute_dtype="float32")


def hf_to_orbax(hf: str, out: str, overwrite: bool = False, atol: float = 1e-4) -> dict:
    """Import a Hugging Face directory as a standalone Orbax export (tokenizer in ``out/tokenizer``)."""
    from jax_controlllm.checkpoint import load_model, save_model
    from jax_controlllm.convert.hf import load_hf

    out_dir = _check_out(out, overwrite)
    _require_kind(hf, "--hf", "hf")
    stages = Stages(3)
    with stages(f"loading {hf}"):
        config, params = load_hf(hf)
    with stages(f"writing {out_dir}"):
        save_model(config, params, out_dir, overwrite=overwrite)
        if _tokenizer_for(hf, None) is not None:
            (out_dir / "tokenizer").mkdir(exist_ok=True)
            _write_tokenizer(hf, None, out_dir / "tokenizer")
    with stages("reloading the export and comparing logits"):
        loaded_config, loaded = load_model(out_dir)
        gap = logit_gap(config, params, loaded_config, loaded,
                        sample_ids(config.vocab_size, config.max_position_embeddings))
        _check_logits(gap, atol, out_dir, "export vs source")
    return {"hf": str(hf), "out": str(out_dir), "max_abs_logit_error": gap}


def gguf_to_hf(gguf: str, out: str, overwrite: bool = False) -> dict:
    """Dequantise a llama GGUF (or the bundled 'smollm2') into a Hugging Face directory."""
    from jax_controlllm.convert.gguf import gguf_to_hf_dir, smollm2_gguf_path

    out_dir = _check_out(out, overwrite)
    if gguf != "smollm2":
        _require_kind(gguf, "--gguf", "gguf")
    path = smollm2_gguf_path() if gguf == "smollm2" else Path(gguf)
    stages = Stages(1)
    with stages(f"dequantising {path.name} into {out_dir}"):
        gguf_to_hf_dir(path, out_dir, progress=True, overwrite=overwrite)
    return {"gguf": str(path), "out": str(out_dir)}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory")
    common.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    common.add_argument("--traceback", action="store_true", help="show the full traceback on errors")

    o2h = sub.add_parser("orbax-to-hf", parents=[common], help="our checkpoint -> Hugging Face directory")
    o2h.add_argument("--ckpt", required=True, help="run directory (latest step), step directory or export")
    o2h.add_argument("--merge-back", action="store_true", help="fold controlled layers into a plain Llama")
    o2h.add_argument("--format", choices=["release", "plain"],
                     help="release: Control LLM's CausalLMExpansion for expanded models (default); plain: Llama")
    o2h.add_argument("--tokenizer", help="tokenizer to copy if none is saved with the checkpoint")
    o2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="tensor dtype (default: as stored)")
    o2h.add_argument("--atol", type=float, default=1e-4, help="allowed max |logit difference| of the check")
    o2h.add_argument("--expanded-from", help="release format: the base model the release's loader reads the "
                     "architecture from (a hub id or directory; default: the base's config shipped in "
                     "OUT/base_config, named by absolute path)")

    h2o = sub.add_parser("hf-to-orbax", parents=[common], help="Hugging Face directory -> standalone Orbax export")
    h2o.add_argument("--hf", required=True)
    g2h = sub.add_parser("gguf-to-hf", parents=[common], help="GGUF file -> Hugging Face directory")
    g2h.add_argument("--gguf", required=True, help="a llama .gguf file, or 'smollm2' for the bundled model")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with one_line_errors(args.traceback):
        if args.command == "orbax-to-hf":
            orbax_to_hf(args.ckpt, args.out, args.merge_back, args.format, args.tokenizer, args.dtype,
                        args.overwrite, args.atol, args.expanded_from)
        elif args.command == "hf-to-orbax":
            hf_to_orbax(args.hf, args.out, args.overwrite)
        else:
            gguf_to_hf(args.gguf, args.out, args.overwrite)
        print(f"ok: wrote {args.out}")


if __name__ == "__main__":
    main()
