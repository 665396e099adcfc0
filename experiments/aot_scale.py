"""The sparse train step at 125M–8B parameters on 64 devices, compiled ahead of time on
fake CPU devices: per-device memory, FLOPs, compile time and the collective inventory.

    python -m experiments.aot_scale                        # 125M/1B/8B × 3 variants × 3 meshes
    python -m experiments.aot_scale --sizes=125M --meshes=fsdp --variants=dense,rigl
    python -m experiments.aot_scale --sizes=64B --devices=256 --meshes=fsdp

Nothing runs: the project's own ``make_trainer`` builds each step exactly as a launch
would (``configs/lm_recall.py`` with the model at scale: head-aligned GQA, float32
parameters, bfloat16 compute, layers scanned with full remat, the residual stream pinned
to batch sharding over the data axis, the loss computed 512
positions at a time; ``synthetic_tokens`` data, global batch ``--batch`` × ``--seq_len``
tokens), then ``trainer.step.lower(...).compile()`` on ``--devices`` fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``, set here before JAX starts).
From each compiled step: ``memory_analysis`` (per-device argument, output, temporary and
total bytes), ``cost_analysis`` (FLOPs per device), the wall time of lowering and
compiling, the kernels XLA generates code for (fused and wrapped computations: a
deterministic measure of compile work), and the collectives of the compiled HLO (ops and
bytes per kind). Compile times vary by ±20% from one minute to the next on this
machine, so every program of a size and mesh is compiled ``--compile_repeats`` times
round robin: the table gives each program's fastest time, and its ratio to dense is the
median of the per-round ratios.

Variants: ``dense``; ``rigl`` (RigL at ``--sparsity``, ERK over every block kernel,
each layer slice of a stacked kernel its own layer; two programs: the plain step and
the step with the mask update); ``sr_ste`` (SR-STE 2:4 on the FFN and attention-output
kernels, whose axis -2 is a contraction axis; q/k/v stay dense, their axis -2 being
the head axis). Meshes: ``fsdp`` (``--devices`` × 1: every kernel split over the data
axis, FSDP), ``16x4`` and ``8x8`` (data × model: heads and the FFN width over the model
axis, the other kernel axis over the data axis, as MaxText's fsdp + tensor).

For each sparse row the JSON and the table give what it adds to the dense row of the
same size and mesh: argument bytes against the local sparse parameters (the target: at
most 1 byte each, the bool masks, plus 64 KiB of scalar state at any size), all-gathers beyond dense (the target: 0), and, for
RigL's mask update, the all-reduce ops it adds (the target: at most 64, however deep).
Figures go to ``--out`` (JSON) and ``--md`` (a table).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="125M,1B,8B")
    p.add_argument("--variants", default="dense,rigl,sr_ste")
    p.add_argument("--meshes", default="fsdp,16x4,8x8")
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--loss_chunk", type=int, default=512)
    p.add_argument("--compile_repeats", type=int, default=3)
    p.add_argument("--render_only", action="store_true",
                   help="rewrite --md from --out's JSON (targets re-checked), compile nothing")
    p.add_argument("--out", default="docs/results/scale.json")
    p.add_argument("--md", default="docs/results/scale.md")
    return p.parse_args(argv)


if __name__ == "__main__":  # before JAX starts: the fake devices
    _ARGS = _parse(sys.argv[1:])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={_ARGS.devices}").strip()

import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import lm_recall  # noqa: E402
from sparsejax.train import make_trainer  # noqa: E402

#: Decoder shapes (Llama-like: GQA, FFN 3.5× wide, 32k vocabulary; 8 K/V heads, so
#: heads split over a model axis of up to 8).
SIZES = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, vocab=256),
    "125M": dict(d_model=768, num_layers=12, num_heads=16, num_kv_heads=8, d_ff=2688,
                 vocab=32000),
    "1B": dict(d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, d_ff=7168,
               vocab=32000),
    "8B": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
               vocab=32000),
    "64B": dict(d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, d_ff=24576,
                vocab=32000),
}
VARIANTS = {"dense": "", "rigl": "rigl,{sparsity}", "sr_ste": "sr_ste,2:4"}
_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def mesh_rules(mesh: str, devices: int):
    """``(mesh shape, sharding rules)`` of a mesh name: 'fsdp' or 'DxM' (data × model).
    Paths are the scanned DecoderLM's (``blocks/...`` with a leading layer axis)."""
    if mesh == "fsdp":
        d, m = "data", None
        shape = (devices, 1)
    else:
        rows, cols = (int(x) for x in mesh.split("x"))
        if rows * cols != devices:
            raise ValueError(f"mesh {mesh} needs {rows * cols} devices, not {devices}")
        d, m = "data", "model"
        shape = (rows, cols)
    rules = (
        (r"blocks/attn/[qkv]/kernel", (None, d, m, None)),   # [L, d_model, heads, hd]
        (r"blocks/attn/o/kernel", (None, m, None, d)),       # [L, heads, hd, d_model]
        (r"blocks/mlp/up/kernel", (None, d, m)),             # [L, d_model, d_ff]
        (r"blocks/mlp/down/kernel", (None, m, d)),           # [L, d_ff, d_model]
        (r"embed/embedding", (m, d)),                        # [vocab, d_model]
        (r"head/kernel", (d, m)),                            # [d_model, vocab]
    )
    return shape, rules


def config(size: str, variant: str, mesh: str, args):
    """The run's config: ``configs/lm_recall.py`` with the model at scale."""
    s = SIZES[size]
    c = lm_recall.get_config(VARIANTS[variant].format(sparsity=args.sparsity))
    c.model.update(d_model=s["d_model"], num_layers=s["num_layers"], num_heads=s["num_heads"],
                   d_ff=s["d_ff"], attention="gqa", dtype="bfloat16", param_dtype="float32",
                   scan_layers=True, remat="full", activation_sharding=("data", None, None))
    c.model.attention_options = {"num_kv_heads": s["num_kv_heads"]}
    c.data = dict(name="synthetic_tokens", vocab_size=s["vocab"], seq_len=args.seq_len,
                  train_size=args.batch, eval_size=args.batch, seed=0)
    c.batch_size, c.loss_chunk = args.batch, min(args.loss_chunk, args.seq_len)
    c.mesh.shape, c.sharding_rules = mesh_rules(mesh, args.devices)
    if variant == "rigl":
        c.method.rules = ((r"blocks/.*kernel", "sparse"), (r".*", "dense"))
        c.method.update_every = 100
    elif variant == "sr_ste":
        c.method.rules = ((r"blocks/mlp/.*kernel", "sparse"), (r"blocks/attn/o/kernel", "sparse"),
                          (r".*", "dense"))
    return c


def collectives(hlo: str) -> dict:
    """``{op: {'ops': n, 'bytes': b, 'shapes': {shape: count}}}`` of compiled HLO text
    (a combined op with a tuple result counts once; its elements' bytes add up)."""
    out = {}
    for op in _OPS:
        results = re.findall(rf"= (\(.*?\)|\S+) {op}(?:-start)?\(", hlo)
        shapes = Counter(s for r in results for s in re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", r))
        nbytes = sum(n * _BYTES.get(s.split("[")[0], 4) * int(np.prod(
            [int(d) for d in s.split("[")[1][:-1].split(",") if d])) for s, n in shapes.items())
        out[op] = {"ops": len(results), "bytes": int(nbytes), "shapes": dict(shapes)}
    return out


def local_bytes(tree, shardings, dtype=None) -> int:
    """Bytes of ``tree``'s leaves (those of ``dtype``, if given) held by one device."""
    total = 0
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        if dtype is None or x.dtype == dtype:
            total += int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def programs(size: str, variant: str, mesh: str, args) -> list[tuple[dict, Callable]]:
    """The programs of one row: its step (and RigL's mask-update step, ``'due'``, what
    the loop dispatches on update steps), each as its figures so far and a function
    that lowers and compiles it."""
    t = make_trainer(config(size, variant, mesh, args))
    st, sh = t.abstract_state, t.state_shardings
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st.params))
    masks = getattr(st.opt_state, "masks", None)
    mask_sh = getattr(sh.opt_state, "masks", None)
    sparse_local = 0
    if masks is not None:
        sparse_local = sum(int(np.prod(s.shard_shape(m.shape)))
                           for m, s in zip(jax.tree.leaves(masks), jax.tree.leaves(mask_sh)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=t.batch_sharding),
                         t.dataset.train.get(np.arange(args.batch)))
    out = []
    for update in ([False, "due"] if t.tx.mask_update_due else [True]):
        program = "mask update" if update == "due" else "step"
        row = dict(size=size, variant=variant, mesh=mesh, program=program, params=params,
                   state_bytes=local_bytes(st, sh), sparse_local_params=sparse_local)

        def build(update=update):
            with jax.set_mesh(t.mesh):
                return t.step.lower(st, batch, update).compile()
        out.append((row, build))
    return out


def kernels(hlo: str) -> int:
    """Fused and wrapped computations of compiled HLO text: the kernels XLA:CPU generates
    code for, most of its compile time (a count that does not vary from run to run)."""
    return len(re.findall(r"^%(?:fused|wrapped)\S* ", hlo, re.M))


def compile_cell(size: str, mesh: str, variants: list[str], args) -> list[dict]:
    """Every program of one size and mesh, compiled ``--compile_repeats`` times round
    robin, so a drift in this machine's speed hits all alike: ``compile_s`` is each
    program's fastest, ``compile_rounds`` its per-round seconds (``compare`` takes the
    median of per-round ratios to dense). Figures from the last compile."""
    progs, rows = [], []
    for variant in variants:
        try:
            progs += programs(size, variant, mesh, args)
        except Exception as e:  # a row that fails to build is a finding: record it
            rows.append(dict(size=size, variant=variant, mesh=mesh, program="step",
                             error=f"{type(e).__name__}: {e}"[:500]))
    for row, _ in progs:
        row["compile_rounds"] = []
    for _ in range(max(getattr(args, "compile_repeats", 1), 1)):
        for row, build in progs:
            if "error" in row:
                continue
            jax.clear_caches()  # else a repeat (or the same program again) is a cache hit
            t0 = time.perf_counter()
            try:
                compiled = build()
            except Exception as e:  # a program that fails to compile is a finding
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                continue
            row["compile_rounds"].append(round(time.perf_counter() - t0, 2))
            row["compiled"] = compiled
    for row, _ in progs:
        compiled = row.pop("compiled", None)
        if "error" in row:
            rows.append(dict((k, row[k]) for k in ("size", "variant", "mesh", "program", "error")))
            continue
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        hlo = compiled.as_text()
        row.update(
            compile_s=min(row["compile_rounds"]),
            args_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            total_bytes=int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                            + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
            flops=float(cost.get("flops", 0.0)) if cost else 0.0,
            kernels=kernels(hlo), collectives=collectives(hlo))
        rows.append(row)
    return rows


def compare(rows: list[dict]) -> list[dict]:
    """Each sparse row against the dense row of its size and mesh, and RigL's mask update
    against its plain step; the targets and whether they hold."""
    dense = {(r["size"], r["mesh"]): r for r in rows if r["variant"] == "dense"}
    plain = {(r["size"], r["mesh"]): r for r in rows
             if r["variant"] == "rigl" and r["program"] == "step"}
    for r in rows:
        d = dense.get((r["size"], r["mesh"]))
        if r["variant"] == "dense" or d is None:
            continue
        extra = r["args_bytes"] - d["args_bytes"]
        r["args_extra_bytes"] = extra
        r["args_extra_per_sparse_param"] = extra / max(r["sparse_local_params"], 1)
        r["all_gathers_beyond_dense"] = (r["collectives"]["all-gather"]["ops"]
                                         - d["collectives"]["all-gather"]["ops"])
        rounds = list(zip(r.get("compile_rounds", []), d.get("compile_rounds", [])))
        r["compile_vs_dense"] = (float(np.median([a / b for a, b in rounds])) if rounds
                                 else r["compile_s"] / max(d["compile_s"], 1e-9))
        if "kernels" in r and "kernels" in d:
            r["kernels_vs_dense"] = r["kernels"] / max(d["kernels"], 1)
        r["meets"] = {"args <= dense + 1 B/sparse param": extra <= r["sparse_local_params"] + _SLACK,
                      "no all-gather beyond dense": r["all_gathers_beyond_dense"] <= 0}
        if r["variant"] == "rigl":
            r["meets"]["compile <= 1.5x dense"] = r["compile_vs_dense"] <= 1.5
        if r["program"] == "mask update":
            p = plain[(r["size"], r["mesh"])]
            r["all_reduces_added_by_update"] = (r["collectives"]["all-reduce"]["ops"]
                                                - p["collectives"]["all-reduce"]["ops"])
            r["meets"]["update adds <= 64 all-reduces"] = r["all_reduces_added_by_update"] <= 64
            # the update's transient: temporaries beyond the plain step's, against the
            # masks' own bytes (one per local sparse parameter)
            r["update_transient_bytes"] = r["temp_bytes"] - p["temp_bytes"]
            r["meets"]["update transient <= masks"] = (r["update_transient_bytes"]
                                                       <= r["sparse_local_params"])
    return rows


#: Bytes of argument growth beyond the masks a sparse row may add: its scalars (step
#: counters, schedule state), whatever the model's size.
_SLACK = 65536


def _mib(b) -> str:
    return f"{b / 2**20:,.0f}"


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows``."""
    head = ("| model | variant | mesh | program | compile s (× dense) | args MiB (extra B per "
            "sparse param) | temp MiB | total GiB | TFLOP/dev | all-gathers (beyond dense) | "
            "all-reduces | targets |\n|" + "---|" * 12 + "\n")
    lines = []
    for r in rows:
        c = r["collectives"]
        vs = f" ({r['compile_vs_dense']:.2f}×)" if "compile_vs_dense" in r else ""
        extra = (f" (+{r['args_extra_per_sparse_param']:.2f})"
                 if "args_extra_per_sparse_param" in r else "")
        ag = c["all-gather"]["ops"]
        ag_s = f"{ag} ({r['all_gathers_beyond_dense']:+d})" if "all_gathers_beyond_dense" in r else f"{ag}"
        ar = f"{c['all-reduce']['ops']}"
        if "all_reduces_added_by_update" in r:
            ar += f" (update +{r['all_reduces_added_by_update']})"
        meets = "" if "meets" not in r else ("all met" if all(r["meets"].values()) else
                                             "missed: " + ", ".join(k for k, v in r["meets"].items() if not v))
        lines.append(f"| {r['size']} | {r['variant']} | {r['mesh']} | {r['program']} | "
                     f"{r['compile_s']:.1f}{vs} | {_mib(r['args_bytes'])}{extra} | "
                     f"{_mib(r['temp_bytes'])} | {r['total_bytes'] / 2**30:.1f} | "
                     f"{r['flops'] / 1e12:.1f} | {ag_s} | {ar} | {meets} |")
    return head + "\n".join(lines) + "\n"


def write(rows: list[dict], meta: dict, args) -> str:
    """``rows`` compared (``compare``) into ``args.out`` (JSON) and ``args.md``; the
    table's text."""
    ok = compare([r for r in rows if "error" not in r])
    failed = [r for r in rows if "error" in r]
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=ok + failed), f, indent=1)
    text = table(ok) + "".join(f"\n- {r['size']} {r['variant']} {r['mesh']}: {r['error']}"
                               for r in failed)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# The sparse step at scale (AOT on {meta['devices']} fake CPU devices)\n\n"
                    f"`{meta['command']}` (jax {meta['jax']}, {meta['cpus']} CPUs, global "
                    f"batch {meta['batch']} × {meta['seq_len']}; written by "
                    "experiments/aot_scale.py, whose docstring says what each column is)\n\n"
                    + text + READING)
    return text


#: What the page says below the table (kept by ``--render_only``).
READING = """
## Reading

- **Everything compiles at 8B** on 64 devices: all three meshes, all three variants
  (before: `OverflowError` at 8B). With bfloat16 compute, full remat, the pinned
  residual stream and the chunked loss, the 8B step needs 3.7 GiB per device on
  FSDP-64 (RigL's update program 3.8 GiB; target: under 40 GB), and 5.1–8.4 GiB on the
  data × model meshes.
- **Arguments**: every sparse row adds 1.00 byte per local sparse parameter (the bool
  masks), plus a few scalars, to dense.
- **Collectives**: no sparse program has an all-gather beyond dense (before: 144–327
  per SR-STE step). RigL's mask update adds 5 all-reduce ops on FSDP and 11 on the
  data × model meshes, the same at 12, 16 and 32 layers (before: 505–757 scalar
  all-reduces). Every count that crosses devices is a small vector, one entry per
  layer: the selection runs in `jax.shard_map` over the params' shardings
  (`masks.selection_shardings`), one `psum` over the mesh per count. The loop constrains gradients
  to the params' shardings, which also took 10 all-gathers out of every step on the
  data × model meshes (33 → 23, 32 → 22).
- **Update transient** (the update program's temporaries beyond the plain step's):
  −5 to +51 MiB, within the masks' own size everywhere (76 MiB of masks per device at
  8B, 10 MiB at 1B). It was +431–447 MiB at 8B before the update read its inputs
  through a flag computed from every gradient (`dst._after_gradients`): XLA:CPU
  drops optimization barriers before it schedules, and had started the update during
  the backward pass, on top of its peak.
- **Compile time** does not grow with depth (the layers are scanned, and one selection
  loop covers all layers, drop and grow). Ratios are medians of 3 round-robin rounds.
  RigL's plain step compiles in 1.01–1.14× the dense step's time and SR-STE's in
  1.05–1.31×. RigL's mask-update program (no `lax.cond`, what the loop dispatches on
  update steps) takes 1.35–1.69×; at 1B 1.52× on FSDP, 1.69× on 16×4 and 1.59× on
  8×8, against a 1.5× target (missed; the run before this one, with 6 more kernels
  per program, measured 1.36×, 1.49× and 1.73×). It generates 1.15–1.22× the dense step's
  kernels (1.29–1.43× before the per-device counting; kernels are deterministic, the
  `kernels` field of the JSON, while this machine's compile times vary by up to 1.7×
  between rounds of the same program). About 0.2× of dense is the tie split's separate radix
  loop, which runs only when a cut falls inside a run of equal keys.
"""


def main(args) -> list[dict]:
    if getattr(args, "render_only", False):  # the page again from its JSON, nothing compiled
        with open(args.out) as f:
            saved = json.load(f)
        print(write(saved["rows"], saved["meta"], args))
        return saved["rows"]
    rows = []
    cells = [(s, m) for s in args.sizes.split(",") for m in args.meshes.split(",")]
    for i, (size, mesh) in enumerate(cells):
        print(f"[{i + 1}/{len(cells)}] {size} {mesh} ...", flush=True)
        got = compile_cell(size, mesh, args.variants.split(","), args)
        for r in got:
            if "error" in r:
                print(f"   {r['variant']} {r['program']} failed: {r['error']}", flush=True)
            else:
                print(f"   {r['variant']} {r['program']}: compile {r['compile_rounds']} s, "
                      f"{r['kernels']} kernels, total {r['total_bytes'] / 2**30:.2f} GiB/device, "
                      f"all-gathers {r['collectives']['all-gather']['ops']}, all-reduces "
                      f"{r['collectives']['all-reduce']['ops']}", flush=True)
        rows += got
    meta = dict(devices=len(jax.devices()), backend=jax.default_backend(),
                jax=jax.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                batch=args.batch, seq_len=args.seq_len, sparsity=args.sparsity,
                loss_chunk=args.loss_chunk, command="python -m experiments.aot_scale "
                + " ".join(sys.argv[1:]))
    print(write(rows, meta, args))
    return rows


if __name__ == "__main__":
    main(_ARGS)
