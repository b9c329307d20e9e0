"""``qcompile doctor``: what this machine can run, and therefore which targets qcompile can use,
what ``target="auto"`` picks on each device, and which optional paths are missing and why.

Everything is read, nothing is changed: CPU features (the integer dot-product instructions ONNX
Runtime's INT8 kernels use: AVX2, AVX-512 VNNI / AVX-VNNI, AMX), the GPU and its compute capability,
the installed packages and ONNX Runtime's execution providers, and each target's own
``can_run`` answer (the one ``torch.compile`` gets).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field

import torch

from qcompiler.lowering import LOWERINGS, auto_choice
from qcompiler.recipes import get_recipe, list_recipes

# the packages qcompile's paths use, and what each is for
PACKAGES = {
    "torch": "everything",
    "onnx": "export, the checker, target 'ort'",
    "onnxruntime": "target 'ort', checking exports",
    "onnxscript": "the ONNX translations",
    "safetensors": "qcompiler.save / load",
    "triton": "target 'triton' (pip install 'qcompiler[gpu]')",
    "transformers": "the bundled models, generate()",
    "tensorrt": "TensorRT engines (pip install 'qcompiler[tensorrt]')",
    "torch_tensorrt": "TensorRT through torch (pip install 'qcompiler[tensorrt]')",
}
# /proc/cpuinfo flag -> what it means here
CPU_FLAGS = {
    "avx2": "AVX2 (ONNX Runtime's baseline INT8 kernels)",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI (INT8 dot products)",
    "avx_vnni": "AVX-VNNI (INT8 dot products)",
    "amx_int8": "AMX INT8 tiles",
    "amx_bf16": "AMX BF16 tiles",
}
# torch._scaled_mm, the triton target's FP8 product (``runtimes.triton_w8a8``), needs Ada / Hopper or newer
FP8_CAPABILITY = (8, 9)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(package: str):
    dist = {"torch_tensorrt": "torch-tensorrt"}.get(package, package)
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


@dataclass
class Diagnosis:
    """What ``diagnose`` found; ``str()`` is the ``qcompile doctor`` text."""

    cpu: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)
    packages: dict = field(default_factory=dict)      # name -> version or None
    providers: list = field(default_factory=list)     # ONNX Runtime's execution providers
    targets: dict = field(default_factory=dict)       # (target, device) -> (ok, reason)
    auto: dict = field(default_factory=dict)          # device -> (target, why others were passed over)
    recipes: dict = field(default_factory=dict)       # recipe name -> what it needs before compiling
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        out = ["qcompile doctor", "", "CPU"]
        out.append(f"  {self.cpu['machine']}, {self.cpu['threads']} threads; torch CPU capability "
                   f"{self.cpu['capability']}")
        flags = self.cpu["flags"]
        out += [f"  {'yes' if flags[f] else 'no ':3}  {CPU_FLAGS[f]}" for f in CPU_FLAGS]
        out += ["", "GPU"]
        if self.gpu:
            out.append(f"  {self.gpu['name']}, compute capability {self.gpu['capability']}, "
                       f"{self.gpu['memory_gib']:.0f} GiB")
        else:
            out.append("  none (torch.cuda.is_available() is False)")
        out += ["", "Packages"]
        out += [f"  {name:15} {ver or 'not installed':14} {PACKAGES[name]}" for name, ver in self.packages.items()]
        if self.providers:
            out.append(f"  onnxruntime providers: {', '.join(self.providers)}")
        out += ["", "Targets"]
        for (name, device), (ok, reason) in self.targets.items():
            out.append(f"  {name:10} on {device:4}  {'available' if ok else 'unavailable: ' + reason}")
        out += ["", 'target="auto" picks']
        for device, (name, passed) in self.auto.items():
            out.append(f"  on {device}: {name}" + (f" (passed over: {passed})" if passed else ""))
        out += ["", "Recipes, and what each needs before compiling"]
        out += [f"  {name:28} {need}" for name, need in self.recipes.items()]
        if self.notes:
            out += ["", "Notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(out)


def diagnose() -> Diagnosis:
    """What this machine can run (see the module docstring)."""
    d = Diagnosis()
    flags = _cpu_flags()
    d.cpu = {"machine": platform.machine(), "threads": os.cpu_count(),
             "capability": torch.backends.cpu.get_cpu_capability(), "flags": {f: f in flags for f in CPU_FLAGS}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        d.gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                 "memory_gib": props.total_memory / 2**30, "fp8": (props.major, props.minor) >= FP8_CAPABILITY}
    d.packages = {name: _version(name) for name in PACKAGES}
    if d.packages["onnxruntime"]:
        import onnxruntime

        d.providers = list(onnxruntime.get_available_providers())
    devices = ["cpu"] + (["cuda"] if d.gpu else [])
    for device in devices:
        example = [torch.zeros(2, 2, device=device)]
        for name, low in LOWERINGS.items():
            d.targets[(name, device)] = low.can_run(example)
        d.auto[device] = auto_choice(device, example)
    for name in list_recipes():
        r = get_recipe(name)
        d.recipes[name] = ("calibration data with the recipe (qcompiler.calibrate(model, batches, recipe=...))"
                           if r.rounds_weights else "calibration data (qcompiler.calibrate)" if r.needs_calibration
                           else "nothing: compiles as is")
    if not d.gpu:
        d.notes.append("no CUDA device: the Triton kernels run only in Triton's CPU interpreter "
                       "(TRITON_INTERPRET=1, slow; tests only)")
    elif not d.gpu["fp8"]:
        d.notes.append(f"compute capability {d.gpu['capability']} < {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}: "
                       "no FP8 tensor-core GEMM (torch._scaled_mm) for the fp8 recipes on this GPU")
    if not any(d.cpu["flags"][f] for f in ("avx512_vnni", "avx_vnni", "amx_int8")):
        d.notes.append("no VNNI / AMX: ONNX Runtime's INT8 kernels use AVX2 here")
    if not d.packages["tensorrt"]:
        d.notes.append("tensorrt is not installed: TensorRT engines cannot be built here; exports in the "
                       "TensorRT form are still checked against its rules (qcompile check)")
    return d
