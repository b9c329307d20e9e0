"""Do two versions of qcompile compute the same thing? A check for changes meant to change no number.

Compiles tiny random-weight models of every architecture in ``tests/tiny_models.py`` with every
recipe on the ``reference`` target (calibrated where the recipe needs it; GPTQ and AWQ run their
block-wise rounding), and SmolLM2-135M with w8a8, w8a8-smoothquant and w4a16, once with the
working tree and once with a base commit, and compares every output bit for bit and every
``explain`` row (scheme, reason, SQNR, sizes).

    python benchmarks/experiments/same_outputs.py --base HEAD      # the working tree against HEAD

The base commit is installed (without dependencies) into a temporary folder that goes first on
``sys.path`` of its own subprocess; both subprocesses run the same probe from this file and the
same model builders from the working tree's ``tests/``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_RECIPES = ["w8a8", "w8a8-static", "w8a8-smoothquant", "w8a8-smoothquant-dynamic", "w8a16", "fp8", "fp8-static",
                "w4a16", "w4a16-gptq", "w4a16-awq"]
REAL_RECIPES = ["w8a8", "w8a8-smoothquant", "w4a16"]


def _tiny_cases():
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    for arch, (_, decoder, _) in tiny_models.ARCHITECTURES.items():
        for recipe in TINY_RECIPES:
            if recipe.startswith("w4a16-") and not decoder:
                continue
            model, vocab = tiny_models.build(arch)
            calib = [tiny_models.token_batch(vocab, 2, 16, seed=s) for s in (1, 2)]
            options = {"recipe": recipe, "group_size": 32} if recipe.startswith("w4a16") else {"recipe": recipe}
            yield f"{arch}/{recipe}", model, calib, tiny_models.token_batch(vocab, 2, 12, seed=3, padded=True), options


def _real_cases():
    from qcompiler.bundled import zoo

    model, tok = zoo.load_smollm2()
    calib, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 64, 3, 1)
    for recipe in REAL_RECIPES:
        yield f"smollm2/{recipe}", model, [{"input_ids": w[None]} for w in calib], {"input_ids": held}, {"recipe": recipe}


def probe(out: str, real: bool) -> None:
    """Compile every case and save its output and explain rows to ``out``."""
    import torch

    import qcompiler

    results = {}
    cases = list(_tiny_cases()) + (list(_real_cases()) if real else [])
    for name, model, calib, batch, options in cases:
        torch._dynamo.reset()
        qcompiler.state_of(model).clear()  # the real model serves several cases
        recipe = qcompiler.get_recipe(options["recipe"])
        try:
            if recipe.rounds_weights:
                qcompiler.calibrate(model, calib, recipe=options, progress=False)
            elif recipe.needs_calibration:
                qcompiler.calibrate(model, calib, progress=False)
            compiled = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
            with torch.no_grad():
                y = compiled(**batch)
        except qcompiler.QcompileError as e:  # the same error from both is the same behaviour
            results[name] = (torch.zeros(0), [f"{type(e).__name__}: {e}"])
            print(name, "raised", type(e).__name__, flush=True)
            continue
        y = y.logits if hasattr(y, "logits") else y.last_hidden_state
        rows = [(r.module, r.op, r.scheme, r.reason, r.sqnr_db, r.weight_bytes_quantized)
                for r in qcompiler.explain(compiled)]
        results[name] = (y.detach().clone(), rows)
        print(name, flush=True)
    torch.save(results, out)


def _install(commit: str, folder: str) -> str:
    src = os.path.join(folder, "src")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", src, commit], check=True,
                   capture_output=True)
    site = os.path.join(folder, "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    site, src], check=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", src], check=True)
    return site


def _run(out: str, real: bool, site: str = None) -> None:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--probe", out] + (["--real"] if real else [])
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="the commit to compare the working tree with")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M too (minutes more)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        probe(args.probe, args.real)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        site = _install(args.base, tmp)
        base, work = os.path.join(tmp, "base.pt"), os.path.join(tmp, "work.pt")
        _run(base, args.real, site)
        _run(work, args.real)
        a, b = torch.load(base), torch.load(work)
    differ = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            differ.append(f"{name}: only in {'base' if name in a else 'working tree'}")
            continue
        (ya, ra), (yb, rb) = a[name], b[name]
        if not torch.equal(ya, yb):
            differ.append(f"{name}: outputs differ (max |diff| {(ya - yb).abs().max().item():.3g})")
        if ra != rb:
            changed = [(x, y) for x, y in zip(ra, rb) if x != y] or [(len(ra), len(rb))]
            differ.append(f"{name}: explain rows differ, first: {changed[0]}")
    print(f"{len(a)} cases at {args.base}, {len(b)} in the working tree; {len(differ)} differ")
    for line in differ:
        print("  " + line)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
