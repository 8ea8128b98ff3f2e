"""The memory planner: the bytes one device holds for a model on a layout, worked out before any device exists.

    python -m dsv4_jax.plan --config flash|pro|PATH --tp 8 [--dp 1] [--ep] [--pp 1] --capacity 131072 \\
        --batch 32 [--gpu-memory 141GB] [--precision released|bf16] [--chunk 16384] [--mtp] [--kv-cache-dtype fp8]

prints a table for one device (of the most loaded pipeline stage when --pp > 1): the weights by kind and
precision, the caches by field, an activation estimate, the total and whether it fits in --gpu-memory
(dsv4_jax/plan.py is the command line; ``plan`` here is the function). PATH: a config.json or a checkpoint
directory. Bad input is one line on stderr and exit code 2.

Weights and caches are counted, not estimated. Every parameter of the abstract model (weights/params.py:
logical axes + Storage, in the precision asked for) is placed as ``weights.sharding.value_placement`` places it
under the layout's ``layout_rules``, on a ``jax.sharding.AbstractMesh`` of the layout's shape (so no device is
needed), and its shards' bytes counted; the caches are ``init_cache``'s abstract shapes for the batch padded to
a multiple of dp, placed by ``cache_shardings``. tests/test_plan.py checks both, byte for byte, against the
arrays a real placement puts on fake devices.

Precision. "released" (what ``from_pretrained`` keeps of a released checkpoint): FP8 one e4m3 byte per value
plus one ue8m0 byte per 128 x 128 block, FP4 half a byte per e2m1 value plus one ue8m0 byte per 1 x 32 block
(a layout must split them at block boundaries: else an error, as at load), MODEL bf16, FP32, INT32. "bf16": the
FP8 and FP4 parameters dequantised to bf16 (``dequantize=True``). Caches are bf16 in both (the compressors'
state rings fp32, as model/compression.py holds them), or with ``kv_cache_dtype="fp8"`` the window
rings and compressed entries in the FP8 layout of model/kv_rows.py (fields ``window_kv.nope`` e4m3,
``.rope`` bf16, ``.scale`` ue8m0 bytes). ``cache_bytes_per_token`` is how a sequence's caches grow per token.

Pipeline stages split the layers as ``pipeline.stage_starts`` does; each stage holds its layers' weights and
caches plus the embedding, final norm, hc_head and LM head, and with ``mtp`` the MTP block and its cache (all of
them on every stage: speculative decoding drafts on every stage). PipelinePlan's padding of a stage's stacks to
the longest stage is not counted.

Activations: an estimate of the largest live intermediates of one prefill step on the GPU kernels path, for
T = ceil(batch / dp) x min(chunk, capacity) tokens per device (s = 2 bytes, n = hc_mult, H' = heads / tp,
H_I' = indexer heads / tp):
    streams    2 T n d s                         a layer's mHC residual streams, in and out
    attention  T (2 H' D s + H_I' D_I s + 4 N_I + 4 k_I)
               queries and output of the device's heads, the indexer's queries, its fp32 scores over the
               N_I = capacity / m_CSA compressed entries and its top-k_I ids (0 for N_I, k_I without CSA)
    experts    R (d s + 2 F' 4 + F' s + 2 d 4)   R = T_e x top-k rows: T_e = T, or T dp under ep (every dp
               shard's tokens); F' = F / tp, or F under ep: the gathered rows, gate | up in fp32, the
               activation, the output in fp32 and its unsorted copy
    logits     4 V B + 4 V' B'                   fp32 logits of the last positions: the whole batch B over the
               vocabulary V (every device holds them) and this device's B' rows over its V' vocabulary rows
    estimate = streams + max(attention, experts) + logits
It leaves out XLA's workspace and fragmentation, and on the XLA path (not the GPU default) the attention
logits are materialised as well. JAX preallocates 75% of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
says otherwise: pass --gpu-memory accordingly.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from ..model.cache import init_cache
from ..model.config import CSA, DeepseekV4Config
from ..model.kv_rows import check_kv_cache_dtype
from ..model.mtp import mtp_config
from ..model.spec import axes_of
from ..model.transformer import InputError
from ..weights import quantization
from ..weights.params import abstract_model, param_table
from ..weights.quant_array import QuantArray
from ..weights.sharding import DP, PP, TP, cache_shardings, value_placement
from .mesh import FLAGS, ModelMesh, check_layout
from .pipeline import stage_of_layer, stage_starts

PRECISIONS = ("bf16", "released")
MODEL_DTYPE = jnp.dtype(jnp.bfloat16)
DEFAULT_CHUNK = 16384  # the engine's prefill chunk on a GPU (runtime.engine.default_prefill_chunk)
WEIGHTS, CACHES, ACTIVATIONS = "weights", "caches", "activations"
# weight kind -> the canonical parameter names it holds (each name matches one); the table's order
_LAYER = r"^model\.layers\.\d+\."
KINDS = (
    ("attention", _LAYER + r"self_attn\.(?!compressor\.)"),
    ("indexer / compressor", _LAYER + r"self_attn\.compressor\."),
    ("routed experts", _LAYER + r"mlp\.experts\."),
    ("shared expert", _LAYER + r"mlp\.shared_experts\."),
    ("router", _LAYER + r"mlp\.gate\."),
    ("mHC / norms", r"^model\.(norm|hc_head|layers\.\d+\.(attn_hc|ffn_hc|input_layernorm|post_attention_layernorm))\."),
    ("embedding + head", r"^(model\.embed_tokens|lm_head)\."),
    ("MTP block", r"^model\.mtp\."),
)
# released block-scaled formats, by quantisation block
RELEASED_LABELS = {quantization.FP8_BLOCK_SHAPE: "fp8 e4m3 + scales", quantization.FP4_BLOCK_SHAPE: "fp4 e2m1 + scales"}
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "int32": "int32", "float8_e4m3fn": "fp8 e4m3", "uint8": "ue8m0"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a plan: ``nbytes`` on one device."""

    section: str  # WEIGHTS, CACHES or ACTIVATIONS
    name: str  # weight kind, cache field or activation term
    held_as: str  # precision or dtype; for an activation term, what it counts
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """The bytes one device of ``stage`` (layers ``layers``) holds, the most loaded stage of ``stages``."""

    stage: int
    stages: int
    layers: range
    rows: tuple[Row, ...]

    def total(self, section: str | None = None) -> int:
        return sum(r.nbytes for r in self.rows if section in (None, r.section))


def layout(tp: int = 1, dp: int = 1, pp: int = 1, ep: bool = False) -> ModelMesh:
    """A ModelMesh over an AbstractMesh of the layout's shape: shardings and shard shapes, no devices."""
    return ModelMesh(AbstractMesh((pp, dp, tp), (PP, DP, TP)), bool(ep))


def weight_kind(name: str) -> str:
    """A canonical parameter name (``model.layers.3.self_attn.q_a_proj.weight``) -> its row in the table."""
    for kind, pattern in KINDS:
        if re.match(pattern, name):
            return kind
    raise ValueError(f"parameter {name} matches no weight kind of runtime.plan.KINDS")


def stage_of(name: str, stages: tuple[int, ...]) -> int | None:
    """The stage holding a parameter (``stages``: each layer's), None for every stage (the MTP block included)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return stages[int(m.group(1))] if m else None


def shard_bytes(value, placed) -> tuple[str, int]:
    """A parameter's value (ShapeDtypeStructs) and its placement (``value_placement``) -> (held as, the bytes of
    one device's shards)."""
    nbytes = sum(math.prod(p.sharding.shard_shape(p.shape)) * leaf.dtype.itemsize
                 for leaf, p in zip(jax.tree.leaves(value), jax.tree.leaves(placed), strict=True))
    if isinstance(value, QuantArray):
        return RELEASED_LABELS[value.block], nbytes
    return SHORT_DTYPE[value.dtype.name], nbytes


def weight_rows(cfg: DeepseekV4Config, mesh: ModelMesh, precision: str, mtp: bool = False) -> list[list[Row]]:
    """Per stage: the weight bytes one of its devices holds, one Row per (kind, held as), in KINDS' order."""
    stages = stage_of_layer(cfg.num_hidden_layers, mesh.pp)
    sums = [{} for _ in range(mesh.pp)]
    for name, var in param_table(abstract_model(cfg, MODEL_DTYPE, mtp, released=precision == "released")).items():
        value = var.get_value()
        try:
            placed = value_placement(f"parameter {name}", axes_of(var), value, mesh.mesh, mesh.rules)
        except ValueError as e:  # a split through quantisation blocks
            raise InputError(str(e)) from None
        held_as, nbytes = shard_bytes(value, placed)
        stage = stage_of(name, stages)
        for s in range(mesh.pp) if stage is None else (stage,):
            key = (weight_kind(name), held_as)
            sums[s][key] = sums[s].get(key, 0) + nbytes
    order = [kind for kind, _ in KINDS]
    return [[Row(WEIGHTS, kind, held_as, n) for (kind, held_as), n in sorted(
        stage.items(), key=lambda item: (order.index(item[0][0]), item[0][1]))] for stage in sums]


def cache_rows(cfg: DeepseekV4Config, mesh: ModelMesh, batch: int, capacity: int, mtp: bool = False,
               kv_cache_dtype: str = "auto") -> list[list[Row]]:
    """Per stage: the cache bytes one of its devices holds for ``batch`` sequences (padded to a multiple of dp)
    of ``capacity`` tokens, one Row per field (``compressor.kv``: the field's path in a LayerCache)."""
    full = mtp_config(cfg) if mtp else cfg
    shapes = jax.eval_shape(lambda: init_cache(full, mesh.rows(batch), capacity, MODEL_DTYPE, kv_cache_dtype))
    shardings = cache_shardings(shapes, mesh.mesh, mesh.rules)
    stages = stage_of_layer(cfg.num_hidden_layers, mesh.pp)
    sums = [{} for _ in range(mesh.pp)]
    for (path, shape), sharding in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings)):
        field = ".".join(p.name for p in path[1:])
        key = (field, SHORT_DTYPE[shape.dtype.name])
        layer = path[0].idx  # the MTP block's layer (the last) is on every stage
        for stage in [sums[stages[layer]]] if layer < cfg.num_hidden_layers else sums:
            stage[key] = stage.get(key, 0) + math.prod(sharding.shard_shape(shape.shape)) * shape.dtype.itemsize
    return [[Row(CACHES, field, held_as, n) for (field, held_as), n in stage.items()] for stage in sums]


def cache_bytes_per_token(cfg: DeepseekV4Config, kv_cache_dtype: str = "auto", mtp: bool = False) -> float:
    """The bytes one sequence's caches (all layers, the MTP block's with ``mtp``) grow by per token of capacity:
    the compressed entries and indexer keys (the window rings and compressor states are a fixed size). Counted from
    ``init_cache``'s shapes at two capacities a multiple of every compression ratio apart."""
    full = mtp_config(cfg) if mtp else cfg
    step = math.lcm(*cfg.compress_rates) if cfg.compress_rates else 1

    def nbytes(capacity: int) -> int:
        shapes = jax.eval_shape(lambda: init_cache(full, 1, capacity, MODEL_DTYPE, kv_cache_dtype))
        return sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))

    return (nbytes(2 * step) - nbytes(step)) / step


def activation_rows(cfg: DeepseekV4Config, mesh: ModelMesh, batch: int, capacity: int, chunk: int) -> list[Row]:
    """The activation estimate of one prefill step on one device (module docstring: the formula), as Rows that
    sum to it: streams, the larger of attention and experts, logits."""
    s = MODEL_DTYPE.itemsize
    rows = mesh.rows(batch)
    local_rows = rows // mesh.dp
    T = local_rows * min(chunk, capacity)
    csa = CSA in cfg.layer_types
    n_index, k_index = (capacity // cfg.csa_compress_rate, cfg.index_topk) if csa else (0, 0)
    heads, index_heads = cfg.num_attention_heads // mesh.tp, cfg.index_n_heads // mesh.tp
    attention = T * (2 * heads * cfg.head_dim * s + index_heads * cfg.index_head_dim * s + 4 * n_index + 4 * k_index)
    width = cfg.moe_intermediate_size if mesh.ep else cfg.moe_intermediate_size // mesh.tp
    d = cfg.hidden_size
    R = T * (mesh.dp if mesh.ep else 1) * cfg.num_experts_per_tok
    experts = R * (d * s + 2 * width * 4 + width * s + 2 * d * 4)
    vocab_rows = -(-cfg.vocab_size // mesh.tp)
    logits = 4 * cfg.vocab_size * rows + 4 * vocab_rows * local_rows
    (peak, nbytes), (other, less) = sorted((("routed experts", experts), ("attention + indexer", attention)),
                                           key=lambda term: -term[1])
    return [Row(ACTIVATIONS, "mHC streams", f"{T} tokens", 2 * T * cfg.hc_mult * d * s),
            Row(ACTIVATIONS, f"peak: {peak}", f"({other} {format_bytes(less)})", nbytes),
            Row(ACTIVATIONS, "logits", f"[{rows}, {cfg.vocab_size}] fp32", logits)]


def check_plan_input(cfg: DeepseekV4Config, tp: int, dp: int, pp: int, ep: bool, capacity: int, batch: int,
                     precision: str, chunk: int, names: dict[str, str] = FLAGS, kv_cache_dtype: str = "auto") -> None:
    """Raise InputError (one line naming the value) for input ``plan`` cannot work out; ``names``: how the caller
    spells the settings (``--tp``; also ``capacity``, ``batch``, ``precision``, ``chunk``, ``kv_cache_dtype``)."""
    try:
        check_kv_cache_dtype(kv_cache_dtype, names.get("kv_cache_dtype", "kv_cache_dtype"))
    except ValueError as e:
        raise InputError(str(e)) from None
    check_layout(cfg, tp, dp, pp, ep, devices=pp * dp * tp, names=names)
    for key, value in (("capacity", capacity), ("batch", batch), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{names.get(key, key)} {value!r} must be a positive integer")
    if precision not in PRECISIONS:
        raise InputError(f"{names.get('precision', 'precision')} {precision!r} must be one of "
                         f"{', '.join(PRECISIONS)}")


def plan(cfg: DeepseekV4Config, tp: int = 1, dp: int = 1, pp: int = 1, ep: bool = False, *, capacity: int,
         batch: int, precision: str = "released", chunk: int = DEFAULT_CHUNK, mtp: bool = False,
         names: dict[str, str] = FLAGS, kv_cache_dtype: str = "auto") -> Plan:
    """The bytes one device holds (of the most loaded stage; the first of equals) for ``batch`` sequences of
    ``capacity`` tokens on the layout tp x dp x pp (+ ``ep``), the caches' K=V rows as ``kv_cache_dtype`` says;
    module docstring: what is counted and how. Bad input: InputError (``check_plan_input``)."""
    check_plan_input(cfg, tp, dp, pp, ep, capacity, batch, precision, chunk, names, kv_cache_dtype)
    mesh = layout(tp, dp, pp, ep)
    activations = activation_rows(cfg, mesh, batch, capacity, chunk)
    bounds = stage_starts(cfg.num_hidden_layers, pp) + (cfg.num_hidden_layers,)
    plans = [Plan(s, pp, range(bounds[s], bounds[s + 1]), tuple(weights + caches + activations))
             for s, (weights, caches) in enumerate(zip(weight_rows(cfg, mesh, precision, mtp),
                                                      cache_rows(cfg, mesh, batch, capacity, mtp,
                                                                 kv_cache_dtype)))]
    return max(plans, key=lambda p: (p.total(), -p.stage))


def parse_bytes(text: str, name: str = "size") -> int:
    """'141GB', '139GiB', '80e9', '512MB' -> bytes (KB/MB/GB/TB: powers of 1000, KiB/MiB/GiB/TiB: of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*(?:([KMGT])(i?)B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"{name} {text!r} must be a positive size such as 141GB, 139GiB or 80e9 (bytes)")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def format_bytes(n: int) -> str:
    """Bytes in the largest decimal unit (B, KB, MB, GB, TB) that keeps the figure at least 1."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_plan(p: Plan, gpu_memory: int) -> str:
    """The plan as a table, its total and whether it fits in ``gpu_memory`` bytes (with the headroom)."""
    lines = [f"one device of stage {p.stage} of {p.stages} (layers {p.layers.start}-{p.layers.stop - 1}, the most "
             "loaded)" if p.stages > 1 else "one device (every device holds the same)"]
    titles = {WEIGHTS: "weights", CACHES: "caches", ACTIVATIONS: "activations (estimate)"}
    for section, title in titles.items():
        lines.append(f"{title:<32}{'held as':<34}{'bytes':>10}")
        lines += [f"  {r.name:<30}{r.held_as:<34}{format_bytes(r.nbytes):>10}" for r in p.rows if r.section == section]
        lines.append(f"  {title.split()[0] + ' total':<64}{format_bytes(p.total(section)):>10}")
    total = p.total()
    lines.append(f"{'total':<66}{format_bytes(total):>10}")
    room = gpu_memory - total
    lines.append(f"fits in {format_bytes(gpu_memory)}: {'yes' if room >= 0 else 'no'} "
                 f"({'headroom' if room >= 0 else 'short by'} {format_bytes(abs(room))})")
    return "\n".join(lines)
