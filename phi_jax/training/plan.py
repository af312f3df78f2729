"""Pod-scale planning on a CPU: compile the real train step ahead of time for N fake devices.

    phi-jax plan --config=configs/phi-2.py --devices 8 64 256

For each mesh size a subprocess fakes N CPU devices (XLA_FLAGS must be set before jax starts, so
one process per size), builds the trainer's own step (`make_train_step`, `make_optimizer`, the
shardings of `phi_jax.sharding`) on abstract inputs and compiles it with `.lower(...).compile()`:
no array is allocated, so phi-2 on 256 devices plans on a laptop. From the compiled program:

  * memory per device: `memory_analysis()` of the real (scanned, full-depth) step:
    arguments + outputs - donated aliases + temporaries;
  * FLOPs, bytes accessed and collective traffic per device: `cost_analysis()` and the HLO text.
    XLA's cost analysis does not multiply a `while` body (the scanned layers) by its trip count,
    so these come from two unrolled compiles with 1 and 2 layers, extrapolated linearly to the
    model's depth (the layers are identical, so this is exact; tests/test_plan.py checks it);
  * a projection per accelerator (`project`): step time = FLOPs / peak + collective bytes / link
    bandwidth (no overlap: a conservative bound), and MFU = model FLOPs (6N-style,
    `ModelConfig.flops_per_token`, causal attention) / (step time x peak).

What the numbers are not: the CPU compiler fuses and schedules differently from TPU/GPU ones,
and the "xla" attention materialises the [B,N,T,S] scores that a flash kernel would not, so the
memory is an upper-leaning estimate, and the step time is a model, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

GIB = 1024 ** 3
BATCH_KEYS = ("tokens", "segment_ids", "positions", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Spec-sheet numbers of one chip (dense bf16, one direction of the links)."""

    name: str
    peak_flops: float  # FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per chip inside a node / ICI domain
    node_size: int  # chips sharing `link_bandwidth`; beyond it `network_bandwidth`
    network_bandwidth: float  # bytes/s per chip between nodes


ACCELERATORS = {
    # Cloud TPU docs: v5e 197 TFLOP/s, 16 GiB HBM2 at 819 GB/s, ICI 1,600 Gbps per chip, 256-chip pods.
    "TPU v5e": Accelerator("TPU v5e", 197e12, 16 * GIB, 819e9, 200e9, 256, 200e9),
    # v5p: 459 TFLOP/s, 95 GiB HBM2e at 2,765 GB/s, ICI 4,800 Gbps per chip.
    "TPU v5p": Accelerator("TPU v5p", 459e12, 95 * GIB, 2765e9, 600e9, 8960, 600e9),
    # H100 SXM: 989 TFLOP/s dense, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 each way) in
    # an 8-GPU node, one 400 Gb/s InfiniBand NIC per GPU between nodes.
    "H100": Accelerator("H100", 989e12, 80 * GIB, 3.35e12, 450e9, 8, 50e9),
}
FIT_FRACTION = 0.9  # leave 10% of HBM to the runtime, fragmentation and the input pipeline


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to run the step: a mesh, a remat policy, rows of 2048-ish tokens per device."""

    name: str
    mesh: Mapping[str, int]
    remat_policy: str = "full"
    rows_per_device: int = 1  # global micro-batch rows = rows_per_device x devices
    rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def default_settings(num_devices: int) -> list[Setting]:
    """The sharding / remat grid the benchmark reports for one mesh size.

    fsdp under the three remat policies; fsdp with 4-way tensor parallelism; fsdp with 4 rows per
    device (phi-2's batch of 1024 on 256 chips, no accumulation); and, past one 8-device node,
    "hybrid" sharding (fsdp inside a node of 8, data parallel across nodes), which keeps the
    parameter all-gathers off the slower network on GPUs. On 8 devices the last row is plain data
    parallelism instead, to show what replicating the optimizer state costs.
    """
    settings = [Setting("fsdp", {"fsdp": -1}, "none"),
                Setting("fsdp", {"fsdp": -1}, "dots_saveable"),
                Setting("fsdp", {"fsdp": -1}, "full"),
                Setting("fsdp, 4 rows", {"fsdp": -1}, "full", rows_per_device=4),
                Setting("fsdp+tp4", {"fsdp": -1, "tensor": 4}, "full")]
    if num_devices > 8:
        settings.append(Setting("hybrid", {"data": -1, "fsdp": 8}, "full"))
    else:
        settings.append(Setting("data-parallel", {"data": -1}, "full"))
    return settings


# ------------------------------------------------------------------------------ collectives
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?(?P<name>%[\w.\-]+)\s*=\s*(?P<type>\([^()]*\)|\S+)\s+"
                          r"(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_GTE_INDEX = re.compile(r"index=(\d+)")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[suf]\d+|bf16|f8\w*|c\d+)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _array_sizes(type_text: str) -> list[int]:
    sizes = []
    for m in _ARRAY.finditer(type_text):
        dtype = m["dtype"]
        width = _BYTES.get(dtype) or max(int(re.sub(r"\D", "", dtype) or 8) // 8, 1)
        sizes.append(width * math.prod(int(d) for d in m["dims"].split(",") if d))
    return sizes


def _replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """Device groups of a collective, from any of XLA's spellings (default: all devices)."""
    import numpy as np

    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs):
        dims = [int(d) for d in m[3].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m[4]:
            ids = ids.transpose([int(p) for p in m[4].split(",")])
        return ids.reshape(int(m[1]), int(m[2])).tolist()
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\]"
                      r"(?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", attrs):
        names = re.findall(r"'(\w+)'=(\d+)", m[1])
        sizes = [int(s) for _, s in names]
        ids = np.arange(math.prod(sizes))
        if m[2]:  # the mesh's device ids: an iota, reshaped and maybe transposed
            ids = ids.reshape([int(d) for d in m[2].split(",")])
            if m[3]:
                ids = ids.transpose([int(p) for p in m[3].split(",")])
        reduced = [i for i, (n, _) in enumerate(names) if f"'{n}'" in m[4]]
        kept = [i for i in range(len(names)) if i not in reduced]
        ids = ids.reshape(sizes).transpose(kept + reduced)
        return ids.reshape(-1, math.prod(sizes[i] for i in reduced)).tolist()
    if m := re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", attrs):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
    if m := re.search(r"source_target_pairs=\{([\d,{}]*)\}", attrs):
        return [[int(x) for x in g.split(",")] for g in re.findall(r"\{(\d+,\d+)\}", m[1])]
    return [list(range(num_devices))]


def collective_traffic(hlo_text: str, num_devices: int, node_size: int = 8) -> dict[str, float]:
    """Bytes each device sends per step, by collective kind, and split at node boundaries.

    Ring costs for a group of n devices and a per-device result of s bytes: all-gather
    (n-1)/n*s, reduce-scatter (n-1)*s, all-reduce 2(n-1)/n*s, all-to-all (n-1)/n*s, permute s.
    The CPU compiler spells a reduce-scatter as an all-reduce whose result every user slices by
    `partition-id` (possibly after a cast); TPU and GPU compilers fuse that into a reduce-scatter,
    so it is counted as one.
    A group is inter-node when its devices are not all in one block of `node_size` ids.
    """
    instructions = [m for m in map(_INSTRUCTION.match, hlo_text.splitlines()) if m]
    users: dict[str, list[re.Match]] = {}
    for ins in instructions:
        for operand in set(re.findall(r"%[\w.\-]+", ins["operands"])):
            users.setdefault(operand, []).append(ins)
    per_device = {ins["name"] for ins in instructions if ins["op"] == "partition-id"}
    for ins in instructions:  # scalars computed from the partition id (slice offsets)
        if re.fullmatch(r"[su]\d+\[\]", ins["type"]) and set(
                re.findall(r"%[\w.\-]+", ins["operands"])) & per_device:
            per_device.add(ins["name"])

    def operands(ins) -> set[str]:
        return set(re.findall(r"%[\w.\-]+", ins["operands"]))

    def sliced_per_device(name: str, size: int, depth: int = 0) -> bool:
        """Every use of `name` slices it by the partition id, possibly after elementwise casts."""
        uses = users.get(name, [])
        if not uses or depth > 8:
            return False
        for use in uses:
            if operands(use) & per_device:
                continue
            elements = [math.prod(int(d) for d in m["dims"].split(",") if d)
                        for m in _ARRAY.finditer(use["type"])]
            if len(operands(use)) == 1 and elements == [size] and sliced_per_device(
                    use["name"], size, depth + 1):
                continue  # a convert / copy / bitcast of the whole value
            return False
        return True

    out = {k: 0.0 for k in _KINDS} | {"intra_node": 0.0, "inter_node": 0.0, "count": 0}
    for ins in instructions:
        op = ins["op"].removesuffix("-start")
        if op not in _KINDS:
            continue
        sizes = _array_sizes(ins["type"])
        groups = _replica_groups(ins["attrs"], num_devices)
        n = 2 if op == "collective-permute" else max(len(groups[0]), 1)
        parts = [(op, s) for s in sizes]
        if op == "all-reduce":
            gtes = {int(_GTE_INDEX.search(u["attrs"])[1]): u["name"] for u in users.get(ins["name"], [])
                    if u["op"] == "get-tuple-element"}
            names = [gtes.get(i) for i in range(len(sizes))] if len(sizes) > 1 else [ins["name"]]
            elements = [math.prod(int(d) for d in m["dims"].split(",") if d)
                        for m in _ARRAY.finditer(ins["type"])]
            parts = [("reduce-scatter", s / n) if name and sliced_per_device(name, e) else (op, s)
                     for name, s, e in zip(names, sizes, elements)]
        spans = any(len({d // node_size for d in g}) > 1 for g in groups)
        for kind, size in parts:
            factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                      "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
            out[kind] += factor * size
            out["inter_node" if spans else "intra_node"] += factor * size
        out["count"] += 1
    out["total"] = out["intra_node"] + out["inter_node"]
    return out


# ---------------------------------------------------------------------------------- compile
def compile_train_step(model_config, optimizer_cfg: Mapping[str, Any], seq_len: int,
                       setting: Setting, devices=None):
    """The trainer's jitted, donated step compiled on abstract inputs: (compiled, mesh).

    Args:
      model_config: the ModelConfig to compile (its remat_policy and scan_layers are used as is).
      optimizer_cfg: the config's `optimizer` section.
      seq_len: L, tokens per row.
      setting: mesh, rules and rows per device.
      devices: the devices of the mesh (default: all of this process's).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from phi_jax import sharding
    from phi_jax.model import Phi
    from phi_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from phi_jax.training.step import init_state, make_train_step

    import ml_collections

    optimizer_cfg = ml_collections.ConfigDict(dict(optimizer_cfg))
    mesh = sharding.make_mesh(dict(setting.mesh), devices)
    rules = sharding.rules_from_config(dict(setting.rules))
    sharding.check_divisibility(model_config, mesh, rules)
    model = Phi(model_config)
    optimizer = make_optimizer(optimizer_cfg, 1000)

    def init_fn(rng):
        return init_state(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"], optimizer, 0)

    state, state_shardings = sharding.abstract_and_shardings(init_fn, jax.random.PRNGKey(0),
                                                             mesh=mesh, rules=rules)
    rows = setting.rows_per_device * mesh.devices.size
    batch_sharding = sharding.batch_sharding(mesh, rules)
    if rows % sharding.batch_divisor(mesh, rules):
        raise ValueError(f"{rows} rows do not split over {sharding.batch_divisor(mesh, rules)} batch "
                         "shards; raise rows_per_device")
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=batch_sharding) for k in BATCH_KEYS}
    step = make_train_step(model, optimizer, schedule=learning_rate_schedule(optimizer_cfg, 1000))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
        return jitted.lower(state, batch).compile(), mesh


def _costs(compiled, num_devices: int) -> dict[str, Any]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "collectives": collective_traffic(compiled.as_text(), num_devices)}


def analyse_setting(model_config, optimizer_cfg: Mapping[str, Any], seq_len: int,
                    setting: Setting, devices=None) -> dict[str, Any]:
    """Memory of the full scanned step, per-device costs extrapolated from 1- and 2-layer compiles."""
    config = model_config.replace(remat_policy=setting.remat_policy)
    t0 = time.perf_counter()
    compiled, mesh = compile_train_step(config.replace(scan_layers=True), optimizer_cfg, seq_len,
                                        setting, devices)
    mem = compiled.memory_analysis()
    n = mesh.devices.size
    memory = {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
              "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
              "code_bytes": mem.generated_code_size_in_bytes}
    memory["peak_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                            + memory["temp_bytes"] + memory["code_bytes"])
    one, two = (_costs(compile_train_step(config.replace(scan_layers=False, n_layers=k), optimizer_cfg,
                                          seq_len, setting, devices)[0], n) for k in (1, 2))
    depth = config.n_layers

    def extrapolate(a, b):
        return a + (depth - 1) * (b - a)

    costs = {"flops": extrapolate(one["flops"], two["flops"]),
             "bytes_accessed": extrapolate(one["bytes_accessed"], two["bytes_accessed"]),
             "collectives": {k: extrapolate(one["collectives"][k], two["collectives"][k])
                             for k in one["collectives"]}}
    tokens = setting.rows_per_device * n * seq_len
    return {"setting": dataclasses.asdict(setting), "devices": n, "mesh": dict(mesh.shape),
            "seq_len": seq_len, "tokens_per_step": tokens, **memory, **costs,
            "model_flops_per_device": config.flops_per_token(seq_len) * tokens / n,
            "compile_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ projection
def project(result: Mapping[str, Any], acc: Accelerator) -> dict[str, Any]:
    """Step time and MFU of one analysed setting on one accelerator, from FLOPs and link traffic.

    step = FLOPs / peak + collective bytes / link bandwidth: communication not overlapped with
    compute, a conservative bound; `step_s_overlapped` = max of the two is the optimistic one.
    HBM time (`hbm_s`, from the CPU compile's bytes accessed) is reported but not used: the CPU
    compiler fuses far less than TPU/GPU ones, so its byte count overstates traffic several-fold.
    """
    coll = result["collectives"]
    intra, inter = coll["intra_node"], coll["inter_node"]
    if result["devices"] <= acc.node_size:  # the whole mesh sits on one node's fast links
        intra, inter = intra + inter, 0.0
    compute_s = result["flops"] / acc.peak_flops
    comm_s = intra / acc.link_bandwidth + inter / acc.network_bandwidth
    step_s, overlapped_s = compute_s + comm_s, max(compute_s, comm_s)
    model = result["model_flops_per_device"]
    return {"accelerator": acc.name, "compute_s": compute_s, "comm_s": comm_s, "step_s": step_s,
            "mfu": model / (step_s * acc.peak_flops), "step_s_overlapped": overlapped_s,
            "mfu_overlapped": model / (overlapped_s * acc.peak_flops),
            "hbm_s": result["bytes_accessed"] / acc.hbm_bandwidth,
            "tokens_per_s_per_device": result["tokens_per_step"] / result["devices"] / step_s,
            "hbm_gib": acc.hbm_bytes / GIB,
            "fits": result["peak_bytes"] <= FIT_FRACTION * acc.hbm_bytes}


# ------------------------------------------------------------------------------ subprocesses
def plan(model_config, optimizer_cfg: Mapping[str, Any], seq_len: int, num_devices: int,
         settings: list[Setting] | None = None, timeout: float = 3600) -> list[dict[str, Any]]:
    """Analyse `settings` on `num_devices` fake CPU devices, in a fresh subprocess."""
    settings = default_settings(num_devices) if settings is None else settings
    job = {"model": model_config.to_dict(), "optimizer": dict(optimizer_cfg), "seq_len": seq_len,
           "settings": [dataclasses.asdict(s) for s in settings]}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={num_devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
               p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    for name in ("PHI_JAX_COORDINATOR", "PHI_JAX_DISTRIBUTED"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "phi_jax.training.plan", "--worker"], input=json.dumps(job),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"planning on {num_devices} devices failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker() -> None:
    from phi_jax.config import ModelConfig

    job = json.loads(sys.stdin.read())
    model_config = ModelConfig.from_dict(job["model"])
    results = []
    for s in job["settings"]:
        setting = Setting(**s)
        results.append(analyse_setting(model_config, job["optimizer"], job["seq_len"], setting))
        print(f"{setting.name} / remat {setting.remat_policy}: {results[-1]['compile_s']:.0f} s",
              file=sys.stderr, flush=True)
    print(json.dumps(results))


def format_table(results: list[dict[str, Any]], accelerators=tuple(ACCELERATORS.values())) -> str:
    """Markdown: one row per (devices, setting), memory and fit, then time and MFU per chip."""
    head = ["devices", "setting", "mesh (d,f,t)", "remat", "rows/device", "GiB/device", "TFLOP/device"]
    for acc in accelerators:
        head += [f"{acc.name} fits", f"{acc.name} step s", f"{acc.name} MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["mesh"]
        s = r["setting"]
        row = [str(r["devices"]), s["name"], f"{m['data']},{m['fsdp']},{m['tensor']}", s["remat_policy"],
               str(s["rows_per_device"]), f"{r['peak_bytes'] / GIB:.1f}", f"{r['flops'] / 1e12:.1f}"]
        for acc in accelerators:
            p = project(r, acc)
            row += ["yes" if p["fits"] else "no", f"{p['step_s']:.2f}", f"{p['mfu']:.0%}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m phi_jax.training.plan --worker`: one planning job (JSON on stdin), run in its own
    process because the fake device count is fixed when jax starts. Users run `phi-jax plan`."""
    parser = argparse.ArgumentParser(prog="python -m phi_jax.training.plan")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.parse_args(argv)
    _worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
