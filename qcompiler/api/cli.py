"""The qcompile command: quantize and save, export to ONNX or a checkpoint, check an ONNX file, list
recipes, doctor.

  qcompile quantize --model smollm2 --recipe w4a16-gptq --option group_size=64 --calib 32 --out smollm2-gptq/
  qcompile checkpoint --model smollm2 --recipe w4a16-gptq --option group_size=64 --state smollm2-gptq/ --out ckpt/
  qcompile export --model minilm --recipe w8a8-smoothquant --out minilm.onnx
  qcompile export --model smollm2 --recipe w4a16 --form ort --out smollm2-w4.onnx
  qcompile export --model mypkg.models:build --recipe w8a8-static --out m.onnx
  qcompile check model.onnx
  qcompile build-engine model.onnx --out model.engine --max-seq 2048
  qcompile recipes
  qcompile doctor

--model is a bundled model (minilm, smollm2) or module:function returning
(model, example_inputs, calibration_batches_or_None[, tokenizer]). --option KEY=VALUE sets any
recipe field (VALUE read as JSON when it parses: 64, true, null, ["*.o_proj"]).

Help and argument errors load neither torch nor onnx; a mistake qcompile can name (an unknown
recipe, a file that is not ONNX, a missing package) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import NamedTuple, Optional

from qcompiler.errors import QcompileError
from qcompiler.recipes import list_recipes

BUNDLED = ("minilm", "smollm2")
FORMS = ("tensorrt", "ort")  # qcompiler.lowering.onnx_ops.FORMS, without importing torch for --help


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Loaded(NamedTuple):
    model: object
    example: object
    batches: object = None   # calibration batches
    tokenizer: object = None


def _options(args) -> dict:
    """The recipe as an options dict: ``--recipe`` and every ``--option KEY=VALUE``."""
    options = {}
    for pair in getattr(args, "option", None) or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QcompileError(f"--option {pair!r}: write KEY=VALUE, e.g. --option group_size=64")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return {**options, "recipe": args.recipe}


def _bundled(name: str, calib: int, seq: int):
    import torch

    from qcompiler.bundled import zoo

    if name == "minilm":
        model, tok = zoo.load_minilm()
        calib_sents, _ = zoo.wiki_sentences(max(calib, 1) * 8, 0)
        batches = [dict(tok(calib_sents[i:i + 8], padding="max_length", truncation=True, max_length=seq,
                            return_tensors="pt")) for i in range(0, calib * 8, 8)]
        # two rows: a batch of one would fix the batch dimension at 1 in the export
        example = {k: v for k, v in (batches[0] if batches else dict(tok(
            ["an example", "another example"], padding=True, return_tensors="pt"))).items()
            if k in ("input_ids", "attention_mask")}
        batches = [{k: b[k] for k in example} for b in batches]
        return Loaded(model, example, batches or None, tok)
    if name == "smollm2":
        model, tok = zoo.load_smollm2()
        ids = zoo.wiki_token_ids(tok, "smollm2")
        calib_w, _ = zoo.lm_windows(ids, seq, max(calib, 2), 0)
        # two rows: a batch of one would fix the batch dimension at 1 in the export
        return Loaded(model, {"input_ids": calib_w[:2]}, [{"input_ids": w[None]} for w in calib_w[:calib]] or None, tok)
    raise QcompileError(f"unknown bundled model {name!r}; use one of {', '.join(BUNDLED)} or module:function")


def _load_model(spec: str, calib: int, seq: int):
    if ":" not in spec:
        return _bundled(spec, calib, seq)
    module, fn = spec.split(":", 1)
    try:
        result = getattr(importlib.import_module(module), fn)()
    except (ImportError, AttributeError) as e:
        raise QcompileError(f"--model {spec}: cannot load {fn!r} from module {module!r} ({e})") from None
    return Loaded(*result)


def cmd_export(args) -> int:
    from qcompiler.deploy.export_onnx import export_onnx
    from qcompiler.recipes import resolve

    options = _options(args)
    resolve(options)  # before minutes of loading and calibrating
    _say(f"loading {args.model} ...")
    model, example, batches, _ = _load_model(args.model, args.calib, args.seq)
    if args.state:
        from qcompiler.deploy.artifacts import load

        load(model, args.state)  # the saved calibration replaces calibrating here
        batches = None
    _say(f"quantizing with {args.recipe}" + (f" (calibrating on {len(batches)} batches)" if batches else "")
         + f", exporting the {args.form} form to {args.out} ...")
    result = export_onnx(model, example, args.out, recipe=args.recipe, form=args.form,
                         calibration=batches if batches else None,
                         options={**{k: v for k, v in options.items() if k != "recipe"}, "embedding": args.embedding})
    print(result.summary())
    return 1 if result.violations else 0


def cmd_quantize(args) -> int:
    from qcompiler.deploy.artifacts import save
    from qcompiler.recipes import resolve

    options = _options(args)
    recipe = resolve(options)  # before minutes of loading and calibrating
    _say(f"loading {args.model} ...")
    loaded = _load_model(args.model, args.calib, args.seq)
    seconds = _calibrate(loaded, options, args.model)
    out = save(loaded.model, args.out, recipe=options)
    print(f"{out}: quantization state of {args.model} for {recipe.name} ({len(loaded.batches)} batches, "
          f"{seconds:.1f} s); use it with qcompiler.load(model, {str(out)!r}) before torch.compile(model, "
          f"backend='qcompile', options={options!r})")
    return 0


def _calibrate(loaded: Loaded, options: dict, model_name: str) -> float:
    """Calibrate ``loaded.model`` for the recipe on its batches (its weight algorithm included); seconds."""
    from qcompiler.api.calibrate import calibrate
    from qcompiler.recipes import resolve

    recipe = resolve(options)
    if not loaded.batches:
        raise QcompileError(f"--model {model_name} gave no calibration batches: return (model, example_inputs, "
                            f"batches) from the function, or use --calib >= 1 with a bundled model")
    _say(f"calibrating {recipe.name} on {len(loaded.batches)} batches ...")
    start = time.perf_counter()
    calibrate(loaded.model, loaded.batches, recipe=options, progress=True)
    return time.perf_counter() - start


def cmd_checkpoint(args) -> int:
    from qcompiler.deploy.checkpoint import export_checkpoint
    from qcompiler.recipes import resolve

    options = _options(args)
    recipe = resolve(options)  # before minutes of loading and calibrating
    _say(f"loading {args.model} ...")
    loaded = _load_model(args.model, args.calib, args.seq)
    if args.state:
        from qcompiler.deploy.artifacts import load

        load(loaded.model, args.state)  # the saved calibration replaces calibrating here
    elif recipe.needs_calibration:
        _calibrate(loaded, options, args.model)
    out = export_checkpoint(loaded.model, args.out, recipe=options, tokenizer=loaded.tokenizer)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: compressed-tensors checkpoint of {args.model} for {recipe.name} ({size / 2**20:.1f} MiB"
          f"{'' if loaded.tokenizer is not None else ', no tokenizer: copy it into the folder'}); "
          f"transformers loads it, `vllm serve {out}` serves it")
    return 0


def cmd_check(args) -> int:
    from qcompiler.deploy import onnx_check

    violations = onnx_check.check(args.path)
    print(f"{args.path}: " + ("conforms to TensorRT explicit quantization" if not violations
                              else f"{len(violations)} violation(s)"))
    for v in violations:
        print(f"  {v}")
    return 1 if violations else 0


def cmd_recipes(args) -> int:
    from qcompiler.recipes import get_recipe

    for name in list_recipes():
        print(f"{name:28s} {get_recipe(name).description}")
    return 0


def cmd_build_engine(args) -> int:
    from qcompiler.runtimes.tensorrt_engine import build_engine, profile_shapes

    profile = profile_shapes(args.path, max_batch=args.max_batch, max_seq=args.max_seq, opt_batch=args.opt_batch,
                             opt_seq=args.opt_seq)  # a bad file or profile fails before TensorRT is needed
    _say(f"building a TensorRT engine from {args.path}; profile: " +
         "; ".join(f"{n} {lo} .. {opt} .. {hi}" for n, (lo, opt, hi) in profile.items()))
    out = build_engine(args.path, args.out, max_batch=args.max_batch, max_seq=args.max_seq,
                       opt_batch=args.opt_batch, opt_seq=args.opt_seq, timing_cache=args.timing_cache,
                       workspace_gib=args.workspace_gib)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    return 0


def cmd_doctor(args) -> int:
    from qcompiler.api.doctor import diagnose

    print(diagnose())
    return 0


def _model_arguments(p: argparse.ArgumentParser, default_recipe: str) -> None:
    """--model, --recipe and --option: what a command that quantizes a model takes."""
    p.add_argument("--model", required=True, metavar="MODEL", default=argparse.SUPPRESS,
                   help=f"a bundled model ({', '.join(BUNDLED)}) or module:function")
    p.add_argument("--recipe", default=default_recipe, choices=list_recipes(), metavar="RECIPE",
                   help="one of: " + ", ".join(list_recipes()))
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a recipe field, e.g. group_size=64 or smooth_skip='[\"*.o_proj\"]' (repeatable)")


STATE_HELP = "a folder written by `qcompile quantize` / qcompiler.save: its calibration is used instead of calibrating again"


def _model_command(sub, name: str, fn, recipe: str, out: str, state: Optional[str], calib: int, seq: int, **about):
    """A subcommand that quantizes a model: its model, recipe, output and calibration arguments."""
    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **about)
    _model_arguments(p, recipe)
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help=out)
    if state:
        p.add_argument("--state", help=state)
    p.add_argument("--calib", type=int, default=calib, help="calibration batches (bundled models)")
    p.add_argument("--seq", type=int, default=seq, help="calibration sequence length (bundled models)")
    p.set_defaults(fn=fn)
    return p


def parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    top = argparse.ArgumentParser(prog="qcompile", description=__doc__.split("\n\n")[0],
                                  epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True,
                             metavar="{quantize,export,checkpoint,check,build-engine,recipes,doctor}")
    _model_command(sub, "quantize", cmd_quantize, "w8a8-smoothquant", "the folder to write", None, 32, 512,
                   help="calibrate a model for a recipe and save its quantization state",
                   description="Calibrate a model for a recipe (running its weight algorithm: AWQ, GPTQ, auto) and "
                               "save the quantization state to a folder, for qcompiler.load.")
    _model_command(sub, "checkpoint", cmd_checkpoint, "w8a8", "the folder to write", STATE_HELP, 32, 512,
                   help="quantize a model and write a compressed-tensors checkpoint (vLLM)",
                   description="Quantize a model with a recipe (calibrating, or from a saved state) and write it as "
                               "a compressed-tensors Hugging Face folder, which transformers loads and vLLM serves.")
    p = _model_command(sub, "export", cmd_export, "w8a8-smoothquant", "the .onnx file to write", STATE_HELP, 8, 128,
                       help="quantize a model and write it as ONNX",
                       description="Quantize a model with a recipe and write it as one ONNX file (checked).")
    p.add_argument("--form", default="tensorrt", choices=FORMS,
                   help="tensorrt: QDQ for TensorRT's explicit quantization; ort: ONNX Runtime's integer kernels")
    p.add_argument("--embedding", choices=["int8"], default=None,
                   help="store embedding tables INT8 per row (a tied lm_head reads the same table)")
    p = sub.add_parser("check", help="check an ONNX file against TensorRT's explicit-quantization rules",
                       description="Check an ONNX file against TensorRT's explicit-quantization rules.")
    p.add_argument("path", help="the .onnx file")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("build-engine", help="build a TensorRT engine from a TensorRT-form ONNX file",
                       formatter_class=fmt,
                       description="Build a TensorRT engine (strongly typed: the file's Q/DQ fix every precision) "
                                   "from an ONNX file written by `qcompile export` (TensorRT form). Needs TensorRT: "
                                   "pip install 'qcompiler[tensorrt]'.")
    p.add_argument("path", help="the .onnx file")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help="the engine file to write")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engine takes")
    p.add_argument("--max-seq", type=int, default=1024, help="largest sequence length the engine takes")
    p.add_argument("--opt-batch", type=int, default=1, help="batch the engine is tuned for")
    p.add_argument("--opt-seq", type=int, default=128, help="sequence length the engine is tuned for")
    p.add_argument("--timing-cache", help="a timing-cache file, read before and written after the build")
    p.add_argument("--workspace-gib", type=float, help="cap on the builder's scratch memory")
    p.set_defaults(fn=cmd_build_engine)
    p = sub.add_parser("recipes", help="list the registered recipes", description="List the registered recipes.")
    p.set_defaults(fn=cmd_recipes)
    p = sub.add_parser("doctor", help="what this machine can run: CPU features, GPU, packages, targets",
                       description="What this machine can run: CPU features, the GPU, the installed packages "
                                   "and ONNX Runtime's providers, each target's availability, and what "
                                   "target='auto' picks.")
    p.set_defaults(fn=cmd_doctor)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except QcompileError as e:
        _say(f"qcompile {args.command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
