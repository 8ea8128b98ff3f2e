"""Write a random checkpoint in DeepSeek's released format, for load and memory benchmarks.

    python -m scripts.make_checkpoint OUT --config flash|pro|PATH [--layers N] [--experts N] [--shard-size 5GB]
        [--seed 0] [--mtp] [--overwrite]

OUT gets config.json (the released spelling: compress_ratios, num_hash_layers, quantization_config), sharded
``model-0000i-of-0000n.safetensors`` files of at most --shard-size each and model.safetensors.index.json. The
tensors carry DeepSeek's official names in the released formats (spec §11.1): FP8 e4m3 linears with one ue8m0
scale per 128 x 128 block, FP4 e2m1 routed experts (one matrix per expert, packed two per int8 byte) with one
ue8m0 scale per 1 x 32 block, norms and the other model-dtype weights bf16, mHC / sinks / biases fp32, the hash
table int64. Values: ``random_init.released_piece`` (the model's init scales, one key per parameter and seed),
drawn and quantised on the default jax device by quantisers that give weights/quantization.py's bits;
``random_init.released_params(cfg, seed)`` builds the same values on the device without a file, for models
larger than the disk.

The layout is planned from the shapes first; a model larger than the free disk space is refused before anything
is written. Then one tensor at a time is drawn, quantised and appended to its shard (never the whole model in
memory), with a progress line on stderr. --layers N keeps the first N layers of the config's schedule,
--experts N sets the routed expert count. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from dsv4_jax.model.config import HASH_MOE, MOE, ConfigError, DeepseekV4Config
from dsv4_jax.model.spec import storage_of
from dsv4_jax.model.transformer import InputError
from dsv4_jax.plan import load_config
from dsv4_jax.runtime.cli import EXIT_USAGE, _HelpFormatter, _Parser
from dsv4_jax.runtime.plan import format_bytes, parse_bytes
from dsv4_jax.weights import quantization
from dsv4_jax.weights.errors import CheckpointError
from dsv4_jax.weights.params import abstract_model, param_table
from dsv4_jax.weights.progress import ByteProgress
from dsv4_jax.weights.random_init import BF16, FP4, FP8, FP32, INT, param_key, released_kind, released_piece
from dsv4_jax.weights.safetensors_io import INDEX_FILE

CONFIG_FILE = "config.json"
METADATA_ENTRY = '"__metadata__": {"format": "pt"}'  # as torch's safetensors writer marks its files
DTYPE_TAGS = {np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0",
              np.dtype(np.int8): "I8", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32",
              np.dtype(np.int64): "I64"}
ITEMSIZE = {tag: dtype.itemsize for dtype, tag in DTYPE_TAGS.items()}
STORED_DTYPE = {BF16: ml_dtypes.bfloat16, FP32: np.float32, INT: np.int64}
# The released config.json (legacy spelling) states these besides the model's sizes.
RELEASED_EXTRAS = {
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                            "weight_block_size": list(quantization.FP8_BLOCK_SHAPE)},
    "expert_dtype": "fp4", "torch_dtype": "bfloat16"}

# Canonical parameter name (no "model." prefix) -> DeepSeek's official one: names.canonical_name backwards,
# applied in order.
_OFFICIAL = [(re.compile(p), r) for p, r in [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"(^|\.)hc_head\.hc_(fn|base|scale)$", r"\1hc_head_\2"),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.sinks$", ".attn_sink"),
    (r"\.position_bias$", ".ape"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
]]


def official_name(canonical: str) -> str:
    """``model.layers.1.self_attn.q_a_proj.weight`` -> ``layers.1.attn.wq_a.weight`` (a stacked expert parameter:
    the ``...ffn.experts`` prefix of its per-expert names)."""
    s = canonical.removeprefix("model.")
    for pattern, repl in _OFFICIAL:
        s = pattern.sub(repl, s)
    return re.sub(r"\.(gate_up_proj|down_proj)$", "", s)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One draw: a parameter, or one expert's matrix of a stacked one, and the stored tensors it becomes."""

    canonical: str
    expert: int | None
    shape: tuple[int, ...]  # of the drawn values
    kind: str  # random_init's FP8, FP4, BF16, FP32 or INT
    parts: tuple[tuple[str, slice], ...]  # (official weight name, its rows of the drawn values)


@dataclasses.dataclass(frozen=True)
class Stored:
    """One tensor of the checkpoint."""

    name: str
    tag: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * ITEMSIZE[self.tag]


def pieces(cfg: DeepseekV4Config, mtp: bool) -> list[Piece]:
    """Every draw of the model, in the abstract model's parameter order; a stacked expert parameter expert by
    expert (gate_up_proj[e] is w1 over w3, down_proj[e] is w2)."""
    out = []
    for name, var in param_table(abstract_model(cfg, np.float32, mtp)).items():
        shape, kind, base = tuple(var.get_value().shape), released_kind(name, storage_of(var)), official_name(name)
        if len(shape) < 3:
            out.append(Piece(name, None, shape, kind, ((base, slice(None)),)))
            continue
        rows = shape[1] // 2
        for e in range(shape[0]):
            parts = ((f"{base}.{e}.w2.weight", slice(None)),) if name.endswith("down_proj") else (
                (f"{base}.{e}.w1.weight", slice(0, rows)), (f"{base}.{e}.w3.weight", slice(rows, None)))
            out.append(Piece(name, e, shape[1:], kind, parts))
    return out


def stored_tensors(piece: Piece) -> list[Stored]:
    """The tensors a piece is stored as: each part's weight, and its ue8m0 scale when FP8 / FP4."""
    out = []
    for name, rows in piece.parts:
        shape = (len(range(*rows.indices(piece.shape[0]))), *piece.shape[1:])
        scale = name.removesuffix(".weight") + ".scale"
        if piece.kind == FP8:
            out += [Stored(name, "F8_E4M3", shape), Stored(scale, "F8_E8M0", quantization.fp8_scale_shape(shape))]
        elif piece.kind == FP4:
            out += [Stored(name, "I8", (*shape[:-1], shape[-1] // 2)),
                    Stored(scale, "F8_E8M0", quantization.fp4_scale_shape(shape))]
        else:
            out.append(Stored(name, DTYPE_TAGS[np.dtype(STORED_DTYPE[piece.kind])], shape))
    return out


def generate(piece: Piece, seed: int, n_experts: int) -> list[np.ndarray]:
    """The piece's tensors, in ``stored_tensors``' order: drawn and quantised on the default device
    (random_init.released_piece), split into its parts (FP4 scales are per row, so rows split them too)."""
    key = param_key(seed, piece.canonical)
    if piece.expert is not None:
        key = jax.random.fold_in(key, piece.expert)
    stored = released_piece(key, piece.canonical, piece.shape, piece.kind, n_experts)
    arrays = [np.asarray(a) for a in (stored if isinstance(stored, tuple) else (stored,))]
    if piece.kind == INT:  # int32 on the device
        arrays = [a.astype(STORED_DTYPE[INT]) for a in arrays]
    return [a[rows] for _, rows in piece.parts for a in arrays]


@dataclasses.dataclass
class Shard:
    """One safetensors file being planned: its tensors and their header entries (JSON text, byte offsets)."""

    tensors: list[Stored] = dataclasses.field(default_factory=list)
    entries: list[str] = dataclasses.field(default_factory=lambda: [METADATA_ENTRY])
    header_chars: int = len(METADATA_ENTRY) + 2  # len("{" + ", ".join(entries) + "}"), kept as entries are appended
    data_bytes: int = 0

    def entry(self, t: Stored) -> str:
        """t's header entry were it appended next."""
        meta = {"dtype": t.tag, "shape": list(t.shape), "data_offsets": [self.data_bytes, self.data_bytes + t.nbytes]}
        return f"{json.dumps(t.name)}: {json.dumps(meta)}"

    def file_bytes(self, entry: str = "", nbytes: int = 0) -> int:
        """The file's size, or its size were a tensor of ``nbytes`` with header ``entry`` appended: the 8-byte
        length, the header padded to a multiple of 8 bytes, the data."""
        chars = self.header_chars + (len(entry) + 2 if entry else 0)
        return 8 + chars + -chars % 8 + self.data_bytes + nbytes

    def header(self) -> bytes:
        """The JSON header, padded with spaces to a multiple of 8 bytes (as the safetensors library writes)."""
        text = "{" + ", ".join(self.entries) + "}"
        return (text + " " * (-len(text) % 8)).encode()

    def append(self, t: Stored, entry: str) -> None:
        self.tensors.append(t)
        self.entries.append(entry)
        self.header_chars += len(entry) + 2
        self.data_bytes += t.nbytes


def plan_shards(tensors: list[Stored], shard_size: int) -> list[Shard]:
    """Tensors in order, each shard filled while its file (header included) stays within ``shard_size`` bytes."""
    shards = [Shard()]
    for t in tensors:
        for shard in (shards[-1], Shard()):
            entry = shard.entry(t)
            if shard.file_bytes(entry, t.nbytes) <= shard_size:
                break
        else:
            raise InputError(f"--shard-size {format_bytes(shard_size)} is smaller than the file of tensor {t.name} "
                             f"alone ({format_bytes(shard.file_bytes(entry, t.nbytes))}); pick a larger one")
        if shard is not shards[-1]:
            shards.append(shard)
        shard.append(t, entry)
    return shards


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def released_config(cfg: DeepseekV4Config, mtp: bool) -> dict:
    """config.json as the release spells it (legacy keys; the MTP block's 0 ends compress_ratios), parsing back
    to ``cfg`` with ``num_nextn_predict_layers`` = 1 with the MTP block, else 0."""
    d = cfg.to_hf_dict()
    n_hash = cfg.mlp_layer_types.count(HASH_MOE)
    if cfg.mlp_layer_types == (HASH_MOE,) * n_hash + (MOE,) * (cfg.num_hidden_layers - n_hash):
        del d["mlp_layer_types"]
        d["num_hash_layers"] = n_hash
    if (cfg.csa_compress_rate, cfg.hca_compress_rate) == (4, 128):  # the reader's defaults
        del d["compress_rates"]
    del d["layer_types"], d["partial_rotary_factor"]
    if "rope_scaling" in d:
        d["rope_scaling"].pop("rope_type")  # the release says "type" only
    ratios = [cfg.layer_compress_rate(i) for i in range(cfg.num_hidden_layers)] + [0] * mtp
    return {**d, "qk_rope_head_dim": cfg.qk_rope_head_dim, "compress_ratios": ratios,
            "num_nextn_predict_layers": int(mtp), **RELEASED_EXTRAS}


def model_config(text: str, layers: int | None, experts: int | None) -> DeepseekV4Config:
    """--config (preset, config.json or checkpoint directory) with its first --layers layers and --experts."""
    cfg = load_config(text)
    if layers is not None:
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise InputError(f"--layers {layers} must be in [1, {cfg.num_hidden_layers}], the layers of --config "
                             f"{text}")
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers, layer_types=cfg.layer_types[:layers],
                                  mlp_layer_types=cfg.mlp_layer_types[:layers])
    if experts is not None:
        cfg = dataclasses.replace(cfg, n_routed_experts=experts)  # validated: a ConfigError names the value
    return cfg


def checkpoint_files(out: Path) -> list[Path]:
    """The files a checkpoint written here consists of (--overwrite removes these, nothing else)."""
    return [f for f in out.glob("*") if f.name in (CONFIG_FILE, INDEX_FILE) or f.suffix == ".safetensors"]


def check_destination(out: Path, overwrite: bool, need: int) -> None:
    """OUT must be empty or absent unless ``overwrite``; ``need`` bytes must fit in the free space (counting
    the files an overwrite replaces)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"OUT {out} exists and is not empty; pass --overwrite to replace its checkpoint files")
    existing = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    free = shutil.disk_usage(existing).free + (sum(f.stat().st_size for f in checkpoint_files(out))
                                                if out.exists() else 0)
    if need > free:
        raise InputError(f"the checkpoint needs {need} bytes ({format_bytes(need)}) but {existing} has {free} bytes "
                         f"({format_bytes(free)}) free; pick fewer --layers or --experts, or another OUT")


def write_checkpoint(out, cfg: DeepseekV4Config, shard_size: int, seed: int = 0, mtp: bool = False,
                     overwrite: bool = False) -> tuple[int, float]:
    """The random released-format checkpoint of ``cfg`` at ``out`` -> (bytes written, seconds)."""
    start = time.perf_counter()
    out = Path(out)
    todo = pieces(cfg, mtp)
    shards = plan_shards([t for p in todo for t in stored_tensors(p)], shard_size)
    names = shard_names(len(shards))
    index = {"metadata": {"total_size": sum(s.data_bytes for s in shards)},
             "weight_map": {t.name: f for s, f in zip(shards, names) for t in s.tensors}}
    texts = {CONFIG_FILE: json.dumps(released_config(cfg, mtp), indent=2), INDEX_FILE: json.dumps(index, indent=2)}
    total = sum(s.file_bytes() for s in shards) + sum(len(t.encode()) for t in texts.values())
    check_destination(out, overwrite, total)
    for f in checkpoint_files(out) if out.exists() else ():
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)

    progress = ByteProgress(index["metadata"]["total_size"], "writing", min_bytes=0)
    queue = iter(t for s in shards for t in s.tensors)  # the planned tensors in file order
    files = iter(zip(shards, names))
    handle, left = None, 0
    for piece in todo:
        for array, want in zip(generate(piece, seed, cfg.n_routed_experts), stored_tensors(piece)):
            planned = next(queue)
            if (planned, DTYPE_TAGS[array.dtype], array.shape) != (want, want.tag, want.shape):
                raise RuntimeError(f"generated {want.name} as {array.dtype} {array.shape}, planned {planned}")
            if left == 0:  # the next shard: its header first
                if handle:
                    handle.close()
                shard, name = next(files)
                handle, left = open(out / name, "wb"), len(shard.tensors)
                header = shard.header()
                handle.write(len(header).to_bytes(8, "little") + header)
            handle.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            left -= 1
            progress.update(want.nbytes, name)
    handle.close()
    progress.close()
    return total, time.perf_counter() - start


def build_parser() -> _Parser:
    p = _Parser(prog="python -m scripts.make_checkpoint", formatter_class=_HelpFormatter,
                description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="checkpoint directory to write (absent or empty)")
    p.add_argument("--config", required=True, help="flash, pro (the released sizes), a config.json or a checkpoint "
                   "directory")
    p.add_argument("--layers", type=int, help="keep the first N layers of the config's schedule")
    p.add_argument("--experts", type=int, help="routed experts per MoE layer")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file (GB, GiB, ... or bytes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (random_init.released_params draws the same)")
    p.add_argument("--mtp", action="store_true", help="with the multi-token-prediction block (mtp.0.*)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint files in a non-empty OUT")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        cfg = model_config(args.config, args.layers, args.experts)
        nbytes, seconds = write_checkpoint(args.out, cfg, parse_bytes(args.shard_size, "--shard-size"), args.seed,
                                           args.mtp, args.overwrite)
    except (InputError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.out}: {nbytes} bytes ({format_bytes(nbytes)}) in {seconds:.1f} s "
          f"({format_bytes(int(nbytes / seconds))}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
