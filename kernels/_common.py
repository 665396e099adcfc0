"""Shared pieces of the kernels: Pallas call options, GPU lowering check, bench timing.

Example::

    from sparsejax.kernels._common import interleaved_ms
    ms = interleaved_ms({"a": lambda: f(x), "b": lambda: g(x)})["ms"]
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
from jax.experimental.pallas import triton as pl_triton


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU (where compiled Pallas kernels run).

    Example::

        interpret = not on_gpu()   # Pallas runs on CPU only in interpret mode
    """
    return jax.default_backend() == "gpu"


def triton_params(num_warps: int = 4, num_stages: int = 2) -> pl_triton.CompilerParams:
    """Compiler params selecting Pallas's Triton lowering (portable, interpret-testable).

    Example::

        pl.pallas_call(kernel, ..., compiler_params=triton_params(num_warps=8))
    """
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def lower_for_gpu(fn: Callable, *args) -> str:
    """Lowers ``jax.jit(fn)(*args)`` for CUDA on any host and returns the StableHLO text.

    No GPU is needed: this runs Pallas's Triton lowering, so a kernel that uses an op the
    GPU backend cannot lower fails here, on CPU, in CI. The text holds one
    ``__gpu$xla.gpu.triton`` custom call per kernel.

    Example::

        assert "xla.gpu.triton" in lower_for_gpu(my_kernel_fn, x)
    """
    from jax import export

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
    return exported.mlir_module()


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int = 7,
                   window_s: float = 0.05) -> dict:
    """Median milliseconds per call of each thunk, timed side by side.

    Each thunk is called once to compile (reported as ``first_call_s``), then every repeat
    times one window of each thunk in turn, so drifts in machine load hit all alike. The
    median window per call is ``ms``; the fastest is ``ms_min``.

    Example::

        r = interleaved_ms({"dense": lambda: f(x), "sparse": lambda: g(x)})
        r["ms"]["dense"] / r["ms"]["sparse"]     # speed-up
    """
    first, calls = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        once = time.perf_counter() - t0
        calls[name] = max(1, min(1000, int(window_s / max(once, 1e-6))))
    windows: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                out = fn()
            jax.block_until_ready(out)
            windows[name].append((time.perf_counter() - t0) / calls[name])
    return {"ms": {n: 1e3 * statistics.median(w) for n, w in windows.items()},
            "ms_min": {n: 1e3 * min(w) for n, w in windows.items()},
            "calls_per_window": calls, "first_call_s": first}


def write_json(path: str | Path, payload: dict) -> Path:
    """Writes a benchmark's results with the device, command and versions that made them.

    Example::

        write_json("experiments/results/kernel_nm_matmul_cpu.json", {"results": rows})
    """
    import jaxlib

    meta = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "python": platform.python_version(),
            "host": platform.node(), "command": " ".join([Path(sys.executable).name, "-m"] +
                                                        [_module_name()] + sys.argv[1:])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, **payload}, indent=2))
    return path


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]
