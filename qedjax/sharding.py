"""Meshes and the one table that maps the model's logical axes onto mesh axes.

The mesh has at most three axes, `data`, `fsdp` and `tensor` (always all three, size 1 where unused,
so one rules table serves every layout). Modules name logical axes on parameters (`embed`, `mlp`,
`q_heads`, ...) and on activations (`batch`, `seq`, `act_embed`, ...); a rules table maps each logical
name to mesh axes. Training shards parameters over `fsdp` (ZeRO-3 style) and `tensor` (Megatron
style) and the batch over `data` x `fsdp`; rollout keeps parameters whole along `fsdp` (no gather per
decoded token) and shards only over `tensor`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, Any]  # logical name -> None | mesh axis | tuple of mesh axes

TRAIN_RULES: Rules = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_vocab": "tensor",
}

ROLLOUT_RULES: Rules = {**TRAIN_RULES, "embed": None}
# An RC summariser's engine (in-process): weights sharded over fsdp as in training (1/F of the memory
# of a rollout-layout copy, gathered for each decoded token), batch and cache as in rollouts. It only
# writes short summaries, and a second whole copy beside the policy's did not fit a 4B async run.
SUMMARIZER_RULES: Rules = TRAIN_RULES


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}. Axes of size 1 may be omitted."""
    sizes = {axis: 1 for axis in AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"bad mesh spec {spec!r}: {part!r} is not AXIS=SIZE with AXIS in {AXES}")
        if name in seen:
            raise ValueError(f"bad mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} is not an integer") from None
        if size < 1:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be >= 1")
        sizes[name] = size
        seen.add(name)
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (or the given ones).

    An empty spec puts every device on `data`. The product of the sizes must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {**{a: 1 for a in AXES}, **spec}
    if isinstance(spec, str) and not spec.strip():
        sizes["data"] = len(devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {format_mesh(sizes)} needs {total} devices, but {len(devices)} are "
                         f"available ({devices[0].platform}); the sizes must multiply to the device count")
    shape = tuple(sizes[a] for a in AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # Topology-aware placement is unavailable for some device sets; order is fine.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def format_mesh(sizes: Mapping[str, int] | Mesh) -> str:
    if isinstance(sizes, Mesh):
        sizes = dict(sizes.shape)
    return ",".join(f"{a}={sizes[a]}" for a in AXES)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
    """Logical axis names -> PartitionSpec. Unknown names are an error (a typo would replicate)."""
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        out.append(rules[name])
    return P(*out)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a (possibly abstract) model state, as a pure dict like nnx.to_pure_dict.

    Every sharded dimension must divide by its mesh axes; the error names parameter and dimension.
    """
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)

    def one(path, logical: P, leaf):
        spec = logical_to_spec(tuple(logical), rules)
        for dim, (axes, name) in enumerate(zip(spec, logical)):
            size = _axis_size(mesh, axes)
            if leaf.shape[dim] % size:
                raise ValueError(f"parameter {_path_name(path)}: dimension {dim} ({name}={leaf.shape[dim]}) "
                                 f"is not divisible by mesh axes {axes} of size {size} "
                                 f"(mesh {format_mesh(mesh)})")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def data_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of batch-major arrays ([B, ...]): batch over the rule's axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch axis is split; global batch sizes must be a multiple of it."""
    return _axis_size(mesh, rules["batch"])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def init_sharded(build: Callable[[], nnx.Module], mesh: Mesh, rules: Rules):
    """Builds a model with every parameter created directly in its shards (never whole on a host).

    Returns (graphdef, params) with params a pure dict of sharded arrays.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract, mesh, rules)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(build())[1]), out_shardings=shardings)()
    return graphdef, params


# --- activation constraints --------------------------------------------------------------------------

_ACTIVATION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("qedjax_activation_sharding",
                                                                     default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """Within this context (entered inside a traced function), `constrain` pins activations."""
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def activation_context() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the enclosing activation_sharding, or None outside one."""
    return _ACTIVATION_CONTEXT.get()


# Activations name their model dim `embed`/`mlp` in the model file; they map to the act_* rules so
# that parameter and activation layouts can differ (batch and params both use `fsdp`).
_ACTIVATION_NAMES = {"embed": "act_embed", "mlp": "act_mlp", "heads": "act_heads", "vocab": "act_vocab"}


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside activation_sharding."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec([_ACTIVATION_NAMES.get(n, n) if n else None for n in names], rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
