"""Shared pieces of the kernels: Pallas call options, GPU lowering check, bench timing.

Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax.kernels._common import interleaved_ms
    >>> x = jnp.ones(8)
    >>> ms = interleaved_ms({"a": lambda: x + 1, "b": lambda: x * 2}, repeats=2,
    ...                     window_s=1e-3)["ms"]
    >>> sorted(ms), all(t > 0 for t in ms.values())
    (['a', 'b'], True)
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

    Example:

        >>> import jax
        >>> from sparsejax.kernels._common import on_gpu
        >>> interpret = not on_gpu()   # Pallas runs on CPU only in interpret mode
        >>> jax.default_backend(), interpret
        ('cpu', True)
    """
    return jax.default_backend() == "gpu"


def triton_params(num_warps: int = 4, num_stages: int = 2) -> pl_triton.CompilerParams:
    """Compiler params selecting Pallas's Triton lowering (portable, interpret-testable).

    Example:

        >>> from sparsejax.kernels._common import triton_params
        >>> p = triton_params(num_warps=8)    # pl.pallas_call(..., compiler_params=p)
        >>> type(p).__name__, p.num_warps, p.num_stages
        ('CompilerParams', 8, 2)
    """
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def lower_for_gpu(fn: Callable, *args) -> str:
    """Lowers ``jax.jit(fn)(*args)`` for CUDA on any host and returns the StableHLO text.

    No GPU is needed: this runs Pallas's Triton lowering, so a kernel that uses an op the
    GPU backend cannot lower fails here, on CPU, in CI. The text holds one
    ``__gpu$xla.gpu.triton`` custom call per kernel.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm
        >>> from sparsejax.kernels._common import lower_for_gpu
        >>> from sparsejax.kernels.nm_matmul.pallas import nm_matmul_pallas
        >>> c = compress_nm(jnp.ones((16, 16)), 2, 4, axis=0)
        >>> fn = lambda x: nm_matmul_pallas(x, c, block_m=16, block_n=16, block_k=16,
        ...                                 interpret=False)
        >>> lower_for_gpu(fn, jnp.ones((16, 16))).count("xla.gpu.triton")   # one kernel
        1
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

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels._common import interleaved_ms
        >>> x = jnp.ones((8, 8))
        >>> r = interleaved_ms({"dense": lambda: x @ x, "sparse": lambda: x.sum()}, repeats=3,
        ...                    window_s=1e-3)
        >>> speedup = r["ms"]["dense"] / r["ms"]["sparse"]
        >>> sorted(r), all(r["ms_min"][n] <= r["ms"][n] for n in r["ms"])
        (['calls_per_window', 'first_call_s', 'ms', 'ms_min'], True)
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

    Example:

        >>> import json, pathlib, tempfile
        >>> from sparsejax.kernels._common import write_json
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = write_json(pathlib.Path(tmp.name) / "results" / "kernel_nm_matmul_cpu.json",
        ...                   {"results": [1, 2]})
        >>> data = json.loads(path.read_text())
        >>> data["results"], data["platform"], sorted(data)
        ([1, 2], 'cpu', ['command', 'device', 'host', 'jax', 'jaxlib', 'num_devices', 'platform',
                         'python', 'results'])
        >>> tmp.cleanup()
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
