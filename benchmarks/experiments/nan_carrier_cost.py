"""What carrying a NaN row through ONNX Runtime's per-token quantization costs.

The ORT form's per-token scale adds ``ReduceSum(x) * 0`` so that a row holding NaN gets a NaN
scale (ONNX Runtime's ReduceMax skips NaN). This times a MiniLM-sized stack (6 x Linear 384 ->
1536 -> 384, 8 x 128 tokens, 2 threads) through the ``ort`` target with the carrier ("new") and
with the scale computed without it ("old"), alternating, medians of 30 calls.

    python benchmarks/experiments/nan_carrier_cost.py
"""
import inspect
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

CARRIER = ("    amax = op.Add(amax, op.Mul(op.ReduceSum(xs, _const([-1], np.int64), keepdims=1), "
           "_const(0.0, np.float32)))\n")


def run(mode: str) -> float:
    import qcompiler  # noqa: F401
    from qcompiler.lowering import onnx_ops, ort

    table = onnx_ops.TRANSLATIONS["ort"]
    key = torch.ops.qcompile.quantize_per_token.default
    original = table[key]
    if mode == "old":  # the same function without the carrier line, in the ORT form's table
        code = inspect.getsource(original)
        assert CARRIER in code, "the carrier line changed: update this experiment"
        namespace = dict(onnx_ops.__dict__)
        exec(code.replace(CARRIER, ""), namespace)
        table[key] = namespace[original.__name__]
    exported_files = ort.cache_folder
    folder = pathlib.Path(tempfile.mkdtemp())  # each run exports its own file (the key ignores this edit)
    ort.cache_folder = lambda kind: folder
    try:
        ort._SESSIONS.clear()
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(),
                                                          torch.nn.Linear(1536, 384)) for _ in range(6)]).eval()
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": "ort"})
        x = torch.randn(8, 128, 384)
        times = []
        with torch.no_grad():
            for _ in range(3):
                fast(x)
            for _ in range(30):
                t = time.perf_counter()
                fast(x)
                times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)
    finally:
        table[key] = original
        ort.cache_folder = exported_files


def main() -> int:
    torch.set_num_threads(2)
    for mode in ("old", "new", "old", "new"):
        print(f"{mode}: {run(mode):.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
