"""One mesh with axes ``data, fsdp, tensor``; logical-axis rules; shardings for state and batches.

Every parameter carries logical axis names (``model.py``). The rule table in the config maps each
logical name to mesh axes (or ``None``: replicated). A logical name with no rule is an error naming
the parameter, never a silent replication. Rules are applied in order and a mesh axis is used at
most once per array, so on an activation ``('batch', 'length', 'embed')`` the batch takes
``('data', 'fsdp')`` and embed (rule ``fsdp``) falls back to replicated: parameters are FSDP-sharded
along embed, activations along batch.

Axis types are ``Auto``: linen's ``with_logical_constraint`` fails on the ``Explicit`` meshes that
``jax.make_mesh`` builds by default.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# The default logical -> mesh table (configs copy it into ``config.rules``). Order matters: see above.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill a single ``-1`` so the product equals ``num_devices``; any mismatch is an error that says so."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape {shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {shape}: entries must be positive, with at most one -1 (fill)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape {shape}: {num_devices} devices cannot be split into {known} x (fill); "
                f"{num_devices} is not a multiple of {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        axes = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True))
        raise ValueError(f"mesh_shape {axes} needs {math.prod(shape)} devices but {num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); checked before anything compiles."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def as_rules(rules: Any) -> Rules:
    """Config rules (lists from a ConfigDict) as the hashable tuple-of-pairs flax expects."""
    out = []
    for name, axes in rules:
        out.append((str(name), tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate the mesh and the logical rules (both needed by the model's activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_shards() -> int:
    """How many ways the active mesh and logical rules (``use``) split the ``batch`` axis; 1 outside them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",))[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def strip_boxes(boxed_tree: Any) -> Any:
    """The values inside the logical-axis boxes, without applying sharding constraints (safe on
    abstract trees outside jit, where ``nn.unbox`` would constrain a ``ShapeDtypeStruct``)."""
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, boxed_tree, is_leaf=_is_box)


def logical_axes(boxed_tree: Any) -> Any:
    """The tree of logical axis-name tuples of a boxed (``LogicallyPartitioned``) tree.

    Every array leaf must be boxed: an unannotated parameter is an error naming it. Unboxed scalars
    (step counters, such as optax's) are replicated.
    """

    def names(path, leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned) and getattr(leaf, "ndim", None) == 0:
            return ()
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(
                f"parameter {_path_str(path)} has no logical axis names (wrap its initializer "
                "in nn.with_logical_partitioning)"
            )
        return tuple(leaf.names)

    return jax.tree_util.tree_map_with_path(names, boxed_tree, is_leaf=_is_box)


def logical_to_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules, what: str = "parameter") -> Any:
    """NamedShardings for a tree of logical-axis tuples; unknown names and uneven splits are errors."""
    known = {name for name, _ in rules}

    def one(path, names, shaped):
        if not hasattr(shaped, "shape"):  # an empty subtree (optax.MultiSteps' skip_state=()): nothing to shard
            return shaped
        for name in names:
            if name is not None and name not in known:
                raise ValueError(
                    f"{what} {_path_str(path)}: logical axis {name!r} has no rule in config.rules "
                    f"(rules cover {sorted(known)}); add ({name!r}, None) to replicate it"
                )
        spec = nn.logical_to_mesh_axes(names, rules)
        for dim, (size, axes) in enumerate(zip(shaped.shape, spec, strict=True)):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            split = math.prod(mesh.shape[a] for a in axes)
            if size % split:
                raise ValueError(
                    f"{what} {_path_str(path)}: dimension {dim} ({names[dim]!r}, size {size}) does not divide "
                    f"evenly over mesh axes {axes} ({split} devices); change the mesh or pad the dimension"
                )
        return NamedSharding(mesh, spec)

    # exactly tuple: optax states are NamedTuples (EmptyState() is an empty one) and must be traversed
    is_names = lambda x: type(x) is tuple and all(n is None or isinstance(n, str) for n in x)
    return jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=is_names)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """Run ``init_fn(rng)`` (returning a boxed tree) so every leaf is created already sharded.

    Shapes come from ``jax.eval_shape``, so no full copy of the model ever sits on one device.
    Returns ``(tree, shardings)`` with the tree unboxed to plain arrays.
    """
    _, shardings = abstract_sharded(init_fn, mesh, rules)
    with use(mesh, rules):
        tree = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return tree, shardings


def abstract_sharded(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """``(shapes, shardings)`` of what ``init_fn(rng)`` (a boxed tree) would create; nothing is allocated.
    The targets for loading a checkpoint straight onto the mesh."""
    key = jax.random.key(0)  # made outside the mesh: an AOT mesh of TPU topology devices cannot run it
    with use(mesh, rules):
        abstract = jax.eval_shape(init_fn, key)
        shapes = strip_boxes(abstract)
        return shapes, logical_to_shardings(logical_axes(abstract), shapes, mesh, rules)


def model_shardings(model: nn.Module, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """``(param shapes, param shardings)`` of ``model`` on ``mesh``."""
    return abstract_sharded(lambda r: model.init(r, np.zeros((1, 8), np.int32))["params"], mesh, rules)


def abstract_params(model: nn.Module, example_tokens: jax.Array) -> Any:
    """The boxed abstract params of ``model`` (shapes and logical names, nothing allocated)."""
    return jax.eval_shape(lambda r: model.init(r, example_tokens)["params"], jax.random.key(0))


def init_params(model: nn.Module, rng: jax.Array, example_tokens: Any, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """Sharded model params (plain arrays) and their shardings."""
    return init_sharded(lambda r: model.init(r, example_tokens)["params"], rng, mesh, rules)


def sharding_for(mesh: Mesh, rules: Rules, logical: Sequence[str | None]) -> NamedSharding:
    """The sharding of an activation or batch array with the given logical axis names."""
    with nn.logical_axis_rules(rules):
        return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical), rules))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch axis is split: every global batch size must be a multiple of it."""
    spec = sharding_for(mesh, rules, ("batch",)).spec[0]
    axes = (spec,) if isinstance(spec, str) else spec or ()
    return math.prod(mesh.shape[a] for a in axes)


def check_batch_size(name: str, size: int, mesh: Mesh, rules: Rules) -> None:
    divisor = batch_divisor(mesh, rules)
    if size % divisor:
        raise ValueError(
            f"{name}={size} must be a multiple of {divisor}, the number of batch shards of mesh {dict(mesh.shape)}"
        )


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Leading axis is the batch; the rest replicated (sequence axes are not sharded)."""
    return sharding_for(mesh, rules, ("batch",) + (None,) * (ndim - 1))


def batch_blocks(shards_of_process: dict[int, set[int]], num_shards: int) -> dict[int, tuple[int, int]]:
    """Which rows each process feeds: ``{process: (i, n)}``, block ``i`` of ``n`` equal contiguous blocks of
    every global batch, given the batch shards (``0 .. num_shards-1``) each process's devices hold.

    Usually every process holds its own shards and ``n`` is the process count. When a batch shard spans
    several processes (a ``tensor`` axis wider than a host's chips, e.g. mesh (1, 8, 8) on 4-chip v5e hosts),
    those processes hold the same block and must feed the same rows; ``n`` is then the number of distinct
    blocks. A layout whose blocks are not equal, contiguous and disjoint cannot be fed row-wise: an error."""
    blocks = sorted({tuple(sorted(held)) for held in shards_of_process.values()})
    size = len(blocks[0])
    contiguous = all(b == tuple(range(b[0], b[0] + size)) for b in blocks)
    if not contiguous or [i for b in blocks for i in b] != list(range(num_shards)):
        raise ValueError(
            f"the processes hold batch shards {dict(sorted(shards_of_process.items()))} of {num_shards}: not equal "
            "contiguous blocks, so no process can feed its rows of a batch; change the mesh shape or device order"
        )
    return {process: (blocks.index(tuple(sorted(held))), len(blocks)) for process, held in shards_of_process.items()}


@functools.cache  # to_global asks on every batch; the answer is fixed by the mesh and rules
def batch_block(mesh: Mesh, rules: Rules) -> tuple[int, int]:
    """``(i, n)``: this process feeds block ``i`` of ``n`` equal blocks of rows of every global batch
    (``batch_blocks``); what the data pipelines take as ``shard``. ``(0, 1)`` on one host."""
    num_shards = batch_divisor(mesh, rules)
    held: dict[int, set[int]] = {}
    for device, (rows,) in batch_sharding(mesh, rules, 1).devices_indices_map((num_shards,)).items():
        held.setdefault(device.process_index, set()).add(rows.start or 0)
    return batch_blocks(held, num_shards)[jax.process_index()]


def to_global(local_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Host-local numpy batch (this process's block of rows, ``batch_block``) -> global jax arrays sharded
    along the batch.

    On one host this is a ``device_put``; on many, the global batch is the processes' blocks in block order
    (processes that share a block pass the same rows).
    """
    _, blocks = batch_block(mesh, rules)

    def put(x):
        x = np.asarray(x)
        shape = (x.shape[0] * blocks, *x.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x, shape)

    return jax.tree.map(put, local_batch)


def put_global(global_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """A global numpy batch that every process holds whole (evaluation prompts, texts to score) -> global
    jax arrays sharded along the batch, each device taking its own rows. Unlike ``to_global``, the batch
    does not grow with the number of processes."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, rules, x.ndim), lambda index: x[index])

    return jax.tree.map(put, global_batch)


def to_host(tree: Any) -> Any:
    """Global jax arrays -> numpy arrays on every process: all-gathered across hosts when sharded over them,
    a plain device-to-host copy on one."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# XLA TPU compiler flags for every run and ahead-of-time compile (MaxText's hand-picked flags turn these two off
# as well). With FSDP the "windowed einsum" turns a weight's all-gather along the contracted axis into a loop
# that adds a full-size partial output to an accumulator in HBM once per shard: the TPU programs' predicted
# traffic fell from 1.71 to 1.24 s a step for sft_llama3_8b (memory-bound at 57% MFU -> compute-bound at 78%)
# and from 12.1 to 2.3 s for ppo_ptx_6p7b's score (docs/scaling.md; predictions, no TPU was run).
TPU_FLAGS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false",
}


def set_tpu_flags() -> None:
    """Add ``TPU_FLAGS`` to ``LIBTPU_INIT_ARGS`` before the TPU backend starts; a flag the environment already
    names keeps its value. No effect on CPU or GPU."""
    current = os.environ.get("LIBTPU_INIT_ARGS", "")
    extra = [f"--{k}={v}" for k, v in TPU_FLAGS.items() if f"--{k}=" not in current]
    os.environ["LIBTPU_INIT_ARGS"] = " ".join([current, *extra]).strip()


def initialize_distributed() -> bool:
    """Join a multi-host run before any other JAX call; a no-op on one host. Returns whether it did. Sets the
    TPU compiler's flags first (``set_tpu_flags``).

    - ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` all set:
      those (any cluster; the local multi-process test uses 127.0.0.1).
    - ``INSTRUCTJAX_DISTRIBUTED=1``: ``jax.distributed.initialize()`` detects the cluster itself (TPU VM
      pods, SLURM, Open MPI; ``scripts/tpu_vm.sh launch`` sets it).
    """
    set_tpu_flags()  # before the backend starts (a later call would not reach libtpu)
    explicit = [os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")]
    if all(explicit):
        address, processes, process_id = explicit
        jax.distributed.initialize(address, num_processes=int(processes), process_id=int(process_id))
        return True
    if os.environ.get("INSTRUCTJAX_DISTRIBUTED", "") not in ("", "0"):
        jax.distributed.initialize()
        return True
    if any(explicit):
        raise ValueError(
            "multi-host needs all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; "
            f"got {dict(zip(('address', 'processes', 'process_id'), explicit, strict=True))}"
        )
    return False


# ----------------------------------------------------------------------------------------------- decoding

DECODE_LAYOUTS = ("replicated", "train")
# Leaves every use of which casts them to the compute dtype first (``model.Linear``, ``nn.Embed``,
# ``sampling._head_vd``): storing them in it for decoding changes no result. Norm scales and biases are not
# cast (LayerNorm computes in float32 with them) and are small.
_CAST_FOR_COMPUTE = ("kernel", "embedding")


def decode_shardings(param_shardings: Any, replicate: Sequence[str] = ("data", "fsdp")) -> Any:
    """The parameters' layout for decoding: each ``NamedSharding`` with the mesh axes ``replicate`` dropped from
    its spec, so parameters are whole over data and fsdp and still split over ``tensor`` where the rules split
    them (heads, kv_heads, mlp, vocab).

    Why: in the training layout (``embed -> fsdp``) every decode step's matmuls need the whole weights, so the
    compiled decode loop all-gathers every parameter at every step (on TPU; docs/scaling.md measures it): the
    parameters cross the interconnect ``max_new_tokens`` times per rollout. Gathered once per iteration into
    this layout, the loop moves only activations. The cost is memory: a chip holds
    ``params x bytes(compute dtype) / tensor`` instead of ``params x bytes(param dtype) / (fsdp x tensor)``
    (bf16 weights: 2.6 GB for 1.3B, 13.4 GB for 6.7B split over the tensor axis). Where that does not fit
    beside the KV cache, the weights must be split over a wider ``tensor`` axis, or decoding kept in the
    training layout (``config.decode_layout='train'``)."""

    def one(sh: NamedSharding) -> NamedSharding:
        spec = []
        for entry in sh.spec:
            axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            kept = tuple(a for a in axes if a not in replicate)
            spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return NamedSharding(sh.mesh, PartitionSpec(*spec))

    return jax.tree.map(one, param_shardings)


def cast_for_compute(params: Any, dtype: Any) -> Any:
    """``params`` with the weights that are only ever used cast to the compute dtype (kernels, embeddings)
    stored in ``dtype``: half the bytes of float32 master weights for bf16 compute, the same results."""

    def one(path, x):
        key = getattr(path[-1], "key", None) if path else None
        return x.astype(dtype) if key in _CAST_FOR_COMPUTE else x

    return jax.tree_util.tree_map_with_path(one, params)


def reshards_for_decoding(mode: str, mesh: Mesh) -> bool:
    """Whether ``config.decode_layout`` ``mode`` ('replicated' or 'train') moves the policy into the decode layout
    on ``mesh``: only 'replicated', and only where parameters are split over data or fsdp."""
    if mode not in DECODE_LAYOUTS:
        raise ValueError(f"config.decode_layout={mode!r}: expected one of {DECODE_LAYOUTS}")
    return mode == "replicated" and mesh.shape["data"] * mesh.shape["fsdp"] > 1


def to_decode_layout(param_shardings: Any, compute_dtype: Any) -> Callable[[Any], Any]:
    """A jitted ``params -> params`` into the decode layout (``decode_shardings``, ``cast_for_compute``): run
    once per PPO iteration before ``sampling.generate``; the training params are left as they are."""
    dtype = jnp.dtype(compute_dtype)
    return jax.jit(lambda p: cast_for_compute(p, dtype), out_shardings=decode_shardings(param_shardings))


def describe(shardings: Any, shapes: Any) -> dict[str, str]:
    """``{param path: "shape -> spec"}``: the human-readable (and golden-tested) sharding table."""
    out = {}

    def add(path, sharding, shaped):
        out[_path_str(path)] = f"{tuple(shaped.shape)} -> {tuple(sharding.spec)}"

    jax.tree_util.tree_map_with_path(add, shardings, shapes)
    return out


def plan(model: nn.Module, mesh: Mesh, rules: Rules, example_tokens: Any) -> dict[str, Any]:
    """What sharding ``model`` on ``mesh`` means, computed from shapes only (nothing allocated):
    total parameters, bytes per device, and the per-parameter table of ``describe``."""
    with use(mesh, rules):
        abstract = abstract_params(model, example_tokens)
        shapes = strip_boxes(abstract)
        shardings = logical_to_shardings(logical_axes(abstract), shapes, mesh, rules)
    per_device = 0
    for shaped, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
        shard_shape = sh.shard_shape(shaped.shape)
        per_device += math.prod(shard_shape) * np.dtype(shaped.dtype).itemsize
    return {
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)),
        "param_bytes_per_device": per_device,
        "mesh": dict(mesh.shape),
        "table": describe(shardings, shapes),
    }
