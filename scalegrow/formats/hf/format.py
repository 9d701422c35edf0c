"""Hugging Face model directories, read and written: the models people actually have.

    DIR/config.json                                   model_type, shapes, rope_theta, rms_norm_eps, ...
    DIR/model.safetensors                             one shard, or
    DIR/model-0000K-of-0000N.safetensors + model.safetensors.index.json
    DIR/generation_config.json, tokenizer files       carried along as they are

`HFReader` serves full tensors under megatron-core names, built from the HF tensors one at a time
(each read by its byte range; nothing else is held). `HFWriter` turns them back into HF tensors and
writes each straight to its place in planned safetensors shards. Which HF tensors make which
megatron-core tensor, and how config.json maps, is one record per family (`families/`). HF has no tensor or
pipeline parallelism and no vocabulary padding: the reader's vocabulary is the true one, the writer
trims Megatron's padded rows.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow.core import arch, sharding
from scalegrow.core.arch import TensorSpec
from scalegrow.core.config import ModelConfig
from scalegrow.core.layout import Layout
from scalegrow.errors import InputError
from scalegrow.formats import receipts
from scalegrow.formats.base import Format, Reader, nbytes, piece_sizes
from scalegrow.formats.hf import fp8
from scalegrow.formats.hf import registry as families
from scalegrow.formats.hf.families.moe import EXPERT
from scalegrow.formats.hf.family import IGNORED, HFFamily, Rule, Unsupported, to_hf, to_megatron
from scalegrow.formats.hf.shards import INDEX, ShardWriter, always_fp32, plan_shards
from scalegrow.formats.io import WriteQueue
from scalegrow.formats.options import HFOptions, OutputOptions

CONFIG = "config.json"
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
READ_DTYPES = {**DTYPES, fp8.FP8_DTYPE: torch.float8_e4m3fn}  # FP8 only with block scales (`fp8.py`)


def tensor_rules(cfg: ModelConfig, family: HFFamily) -> dict[str, tuple[Rule, dict]]:
    """Global megatron-core key -> (its rule, the indices its HF names take: {i: layer, e: expert})
    for every tensor `cfg` has. A tied model has no output layer of its own (HF omits `lm_head.weight`)."""
    by_name = {r.megatron: r for r in family.layer}
    out: dict[str, tuple[Rule, dict]] = {}
    for i in range(cfg.num_layers):
        for spec in arch.layer_specs(cfg, i):
            expert = arch.expert_of(spec.name)
            if expert is None:
                out[arch.layer_key(i, spec.name)] = (by_name[spec.name], {"i": i})
            else:  # one rule for every expert: `mlp.experts.local_experts.{e}.linear_fc1.weight`
                out[arch.layer_key(i, spec.name)] = (by_name[EXPERT + expert[1]], {"i": i, "e": expert[0]})
    wanted = [s.name for s in arch.embedding_specs(cfg) + arch.final_norm_specs(cfg)]
    wanted += [] if cfg.embedding.tied else [arch.OUTPUT_LAYER]
    by_key = {r.megatron: r for r in family.globals}
    out.update({key: (by_key[key], {}) for key in wanted})
    return out


def spec_of(cfg: ModelConfig, key: str) -> TensorSpec:
    parsed = arch.split_layer_key(key)
    if parsed is None:
        specs = arch.embedding_specs(cfg) + arch.final_norm_specs(cfg) + [arch.OUTPUT_SPEC]
        return next(s for s in specs if s.name == key)
    return next(s for s in arch.layer_specs(cfg, parsed[0]) if s.name == parsed[1])


def hf_tensors(cfg: ModelConfig, family: HFFamily) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor a `cfg`-shaped model of `family` stores, in model order
    (the shapes come from running the layout transform on meta tensors)."""
    out = []
    for key, (rule, where) in tensor_rules(cfg, family).items():
        meta = torch.empty(arch.full_shape(cfg, spec_of(cfg, key)), device="meta")
        parts = to_hf(rule.kind, meta, cfg)
        if rule.kind == "stacked":  # one tensor for every expert, listed with the first
            out += [(rule.hf[0].format(**where), (cfg.moe.num_experts, *parts[0].shape))] if where["e"] == 0 else []
        else:
            out += [(name.format(**where), tuple(p.shape)) for name, p in zip(rule.hf, parts)]
    return out


# ---- reading --------------------------------------------------------------------------------------------
@dataclass
class HFReader(Reader):
    """An HF directory: config.json mapped onto `ModelConfig`, tensors read lazily by name."""

    hf_config: dict = field(default_factory=dict, repr=False)
    entries: dict[str, "Entry"] = field(default_factory=dict, repr=False)  # HF name -> where its data is
    _rules: dict = field(default_factory=dict, repr=False)

    expert_layout: str = "per-expert"  # an MoE model's (EXPERT_LAYOUTS), as its tensor names say
    scales: dict[str, "Entry"] = field(default_factory=dict, repr=False)  # FP8 weight name -> its scale_inv
    block: tuple[int, int] | None = None  # FP8 quantisation blocks (None: not quantised)
    mtp: tuple[str, ...] = ()  # multi-token-prediction tensors (model.layers.{L..}.*), which scalegrow does not read

    format = "hf"

    @property
    def family(self) -> HFFamily:
        return families.get(self.hf_config["model_type"]).with_layout(self.expert_layout)

    def hf_origin(self) -> dict:
        return {"model_type": self.family.model_type, "config": self.hf_config, "expert_layout": self.expert_layout}

    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})

    def _get(self, name: str, index: int | None = None) -> torch.Tensor:
        """One HF tensor (or its slice `index` along dim 0), read by its byte range into memory of its
        own. (safetensors' `safe_open` maps the whole file, and every page it touches stays in RSS until
        the file is closed, so memory would grow to the size of the source; a positioned read holds
        one tensor.)"""
        raw = _read(name, self.entries[name], index)
        if name not in self.scales:
            return raw
        return fp8.dequantize(raw, _read(name + fp8.SCALE_SUFFIX, self.scales[name], index), self.block, self.dtype)

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        self._rules = self._rules or tensor_rules(self.config, self.family)
        rule, where = self._rules[key]
        index = where["e"] if rule.kind == "stacked" else None
        parts = [self._get(name.format(**where), index) for name in rule.hf]
        return to_megatron(rule.kind, parts, self.config).contiguous()

@dataclass(frozen=True)
class Entry:
    """A tensor in a safetensors file: its shape, dtype and absolute byte range."""

    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


def is_hf(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and any(path.glob("*.safetensors"))


def open_hf(path: str | Path, validate: bool = True) -> HFReader:
    """Open an HF directory: config.json understood (or an exit-2 error naming the key), every tensor
    the config implies present with its shape, one dtype, nothing unexpected. Without `validate` only
    the file headers are read (they are read anyway: a header is a few kB)."""
    root = Path(path)
    if not (root / CONFIG).is_file():
        raise InputError(f"{root}: not a Hugging Face model directory (no {CONFIG})")
    try:
        hf_config = json.loads((root / CONFIG).read_text())
        config = families.config_from_hf(hf_config)
    except Unsupported as exc:
        raise InputError(f"{root / CONFIG}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{root / CONFIG}: unreadable model config ({type(exc).__name__}: {exc})") from None
    entries, scales = _entries(root), {}
    block = _block_size(root, hf_config)
    if block is not None:
        entries, scales = fp8.split_scales(entries)
    _check_quantised(root, entries, scales)
    dtypes = {e.dtype for name, e in entries.items() if name not in scales and not always_fp32(name)}
    if len(dtypes) > 1:
        raise InputError(f"{root}: mixed tensor dtypes {sorted(dtypes)}")
    layout = "fused" if any(name.endswith(FUSED_MARK) for name in entries) else "per-expert"
    mtp = mtp_tensors(entries, config.num_layers, hf_config)
    _check_tensors(root, families.get(hf_config["model_type"]).with_layout(layout), config,
                   {k: v for k, v in entries.items() if k not in mtp})
    return HFReader(root, "release", None, config, Layout.single(config.num_layers),
                    DTYPES[dtypes.pop()] if dtypes else torch.float32, hf_config, entries, expert_layout=layout,
                    scales=scales, block=block, mtp=tuple(sorted(mtp)))


def mtp_tensors(entries: dict, num_layers: int, hf_config: dict) -> set[str]:
    """The tensors of the `num_nextn_predict_layers` multi-token-prediction layers DeepSeek stores
    after the model's own (`model.layers.61.*` in DeepSeek-V3)."""
    extra = range(num_layers, num_layers + int(hf_config.get("num_nextn_predict_layers") or 0))
    prefixes = tuple(f"model.layers.{i}." for i in extra)
    return {name for name in entries if prefixes and name.startswith(prefixes)}


def _block_size(root: Path, hf_config: dict) -> tuple[int, int] | None:
    try:
        return fp8.block_size(hf_config)
    except Unsupported as exc:
        raise InputError(f"{root / CONFIG}: {exc}") from None


def _check_quantised(root: Path, entries: dict[str, "Entry"], scales: dict[str, "Entry"]) -> None:
    """Every FP8 tensor has its scales (what it would mean without them is unknown)."""
    for name, entry in entries.items():
        if entry.dtype == fp8.FP8_DTYPE and name not in scales:
            raise InputError(f"{entry.file}: {name}: an FP8 tensor without {name}{fp8.SCALE_SUFFIX} (and a "
                             f"{fp8.QUANT_KEY} with weight_block_size in {CONFIG})")


def _read(name: str, entry: "Entry", index: int | None = None) -> torch.Tensor:
    """A safetensors tensor (or its slice `index` along dim 0) by its byte range."""
    shape, offset, size = entry.shape, entry.offset, entry.nbytes
    if index is not None:  # one expert of a stacked [E, ...] tensor: a contiguous byte range
        shape, size = shape[1:], size // shape[0]
        offset += index * size
    if size == 0:
        return torch.empty(shape, dtype=READ_DTYPES[entry.dtype])
    data = bytearray(size)
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(offset)
        if f.readinto(data) != size:
            raise InputError(f"{entry.file}: {name}: file ends before the tensor's data")
    return torch.frombuffer(data, dtype=READ_DTYPES[entry.dtype]).reshape(shape)


FUSED_MARK = ".mlp.experts.gate_up_proj"  # a tensor only the fused expert layout has


def _entries(root: Path) -> dict[str, Entry]:
    """HF name -> where its data is, from every shard's header (no tensor data is read)."""
    index = root / INDEX
    if index.is_file():
        files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    out = {}
    for file in files:
        if not file.is_file():
            raise InputError(f"{file}: missing shard named by {index}")
        start, header = _read_header(file)
        for name, entry in header.items():
            if entry["dtype"] not in READ_DTYPES:
                raise InputError(f"{file}: {name}: dtype {entry['dtype']} is not supported (F32, BF16, F16, and "
                                 f"F8_E4M3 with block scales)")
            begin, end = entry["data_offsets"]
            out[name] = Entry(file, tuple(entry["shape"]), entry["dtype"], start + begin, end - begin)
    return out


def _read_header(file: Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header) of a safetensors file: 8 bytes of header length, then
    the header {name: {dtype, shape, data_offsets}} whose offsets count from the end of the header."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise InputError(f"{file}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return 8 + size, header


def _check_tensors(root: Path, family: HFFamily, cfg: ModelConfig, entries: dict[str, Entry]) -> None:
    expected = dict(hf_tensors(cfg, family))
    for name, shape in expected.items():
        if name not in entries:
            raise InputError(f"{root}: {name}: missing tensor (expected shape {shape} from {CONFIG})")
        if entries[name].shape != shape:
            raise InputError(f"{entries[name].file}: {name}: shape {entries[name].shape} does not match {shape} "
                             f"expected from {CONFIG}")
    for name, entry in entries.items():
        tied_head = cfg.embedding.tied and name == "lm_head.weight"
        if name not in expected and not tied_head and not name.endswith(IGNORED):
            raise InputError(f"{entry.file}: {name}: unexpected tensor for this {CONFIG}")


# ---- writing --------------------------------------------------------------------------------------------
def family_for(cfg: ModelConfig, source: Reader, opts: HFOptions) -> tuple[HFFamily, dict | None]:
    """The HF family to write and the config.json to start from: --hf-model-type, else the family
    the source (or what it was converted from) had (its MoE sibling once upcycled), else the one the
    model's structure implies."""
    origin = source.hf_origin() or {}
    was = families.FAMILIES.get(origin.get("model_type"))
    had = families.FAMILIES[was.moe_sibling] if was and cfg.moe and not was.moe and was.moe_sibling else was
    try:
        family = families.get(opts.model_type, "--hf-model-type") if opts.model_type else had or families.infer(cfg)
    except Unsupported as exc:
        raise InputError(str(exc)) from None
    layout = opts.expert_layout or origin.get("expert_layout") or "per-expert"  # the source's by default
    return family.with_layout(layout), origin.get("config") if family in (was, had) else None


class HFWriter:
    """Streams full tensors into planned safetensors shards; config.json is written at the end. Any
    number of writers may share the shards (`restrict`): each puts its own tensors at their places
    and leaves a receipt of them; `complete` checks that the receipts cover the plan exactly once."""

    def __init__(self, out_dir: Path, cfg: ModelConfig, layout: Layout, source: Reader,
                 opts: OutputOptions = OutputOptions(), plan_only: bool = False):
        assert layout.tp == 1 and layout.pp == 1 and layout.ep == 1, "HF checkpoints have no model parallelism"
        self.out_dir, self.cfg, self.layout, self.dtype = out_dir, cfg, layout, opts.weights_dtype(source.dtype)
        self.family, base = family_for(cfg, source, opts.hf)
        try:
            self.hf_config = self.family.to_hf_config(cfg, base, self.dtype)
        except Unsupported as exc:
            raise InputError(f"--hf-model-type: {exc}") from None
        self.rules = tensor_rules(cfg, self.family)
        self.shards = plan_shards(hf_tensors(cfg, self.family), self.dtype, opts.hf.max_shard_size)
        self._shapes = {name: shape for tensors in self.shards.values() for name, shape in tensors}
        self._written: list[tuple[str, int | None]] = []  # (HF name, expert slice or None), as written
        self._files = None if plan_only else ShardWriter(out_dir, self.shards, self.dtype)
        self._name: str | None = None  # a worker's ("{rank}_{worker}"), once restricted
        self._queue = WriteQueue()  # its thread starts with the first write

    @property
    def plan(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {file: dict(tensors) for file, tensors in self.shards.items()}

    def restrict(self, units: frozenset, name: str) -> None:
        """A worker's writer: the executor hands it only its pieces; it leaves a receipt at `finish`."""
        self._name = name

    def open_stage(self, stage: int) -> None:
        pass

    def write(self, key: str, full: torch.Tensor) -> None:
        if key not in self.rules:
            assert key == arch.OUTPUT_LAYER and self.cfg.embedding.tied, f"{key}: not a tensor of this model"
            return
        rule, where = self.rules[key]
        spec = spec_of(self.cfg, key)
        if spec.packing == arch.VOCAB:  # Megatron's padded rows are no tokens
            full = sharding.pad_vocab(spec, full, self.cfg.padded_vocab_size)
        for name, part in zip(rule.hf, to_hf(rule.kind, full.to(arch.stored_dtype(key, self.dtype)), self.cfg)):
            name, index = name.format(**where), where["e"] if rule.kind == "stacked" else None
            want = self._shapes[name][1:] if index is not None else self._shapes[name]  # stacked: expert e's slice
            assert tuple(part.shape) == want, f"{name}: operator produced {tuple(part.shape)}, expected {want}"
            self._written.append((name, index))
            if self._files is not None:  # on a writer thread: pwrite releases the GIL, the next tensor computes
                self._queue.submit(functools.partial(self._files.write, name, part, index), self._files.path(name))

    def close_stage(self) -> None:
        pass

    def finish(self) -> None:
        self._queue.close()
        if self._files is not None:
            self._files.close()
        if self._name is not None:
            receipts.leave(self.out_dir, self._name, self._written)
            return
        self._seal(self._written)

    def complete(self) -> None:
        """Every worker has finished: their receipts checked against the plan, then the index and config."""
        self._seal([(name, index) for name, index in receipts.collect(self.out_dir)])

    def _seal(self, written: list[tuple[str, int | None]]) -> None:
        planned = Counter((name.format(**where), where["e"] if rule.kind == "stacked" else None)
                          for rule, where in self.rules.values() for name in rule.hf)  # stacked: by expert
        wrong = (Counter(written) - planned) + (planned - Counter(written))
        assert not wrong, f"tensors written other than once each: {sorted(wrong)[:3]}"
        if self._files is not None:
            self._files.write_index()
            (self.out_dir / CONFIG).write_text(json.dumps(self.hf_config, indent=2) + "\n")

    def abort(self) -> None:
        self._queue.abort()
        if self._files is not None:
            self._files.close()


def target_config(cfg: ModelConfig, tp: int, vocab_size: int | None) -> ModelConfig:
    """No padding: the vocabulary is the tokenizer's (--vocab-size, else args', else every row)."""
    true_size = vocab_size or cfg.vocab_size or cfg.padded_vocab_size
    if true_size > cfg.padded_vocab_size:
        raise InputError(f"--vocab-size: {true_size} exceeds the checkpoint's {cfg.padded_vocab_size} "
                         f"vocabulary rows")
    return cfg.replace(padded_vocab_size=true_size, vocab_size=true_size)


def checkpoint_bytes(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> int:
    return sum(nbytes(shape, dtype) for _, shape in hf_tensors(cfg, families.infer(cfg)))


def plan_writer(out_dir: Path, cfg: ModelConfig, layout: Layout, source: Reader, opts: OutputOptions) -> HFWriter:
    return HFWriter(out_dir, cfg, layout, source, opts, plan_only=True)


FORMAT = Format("hf", "Hugging Face safetensors", is_hf, open_hf, HFWriter, target_config, checkpoint_bytes,
                parallel=False, planner=plan_writer, work_units=piece_sizes)
