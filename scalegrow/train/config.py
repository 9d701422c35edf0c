"""Run configs: YAML plus `dotted.key=value` overrides -> typed dataclasses. Unknown keys are errors.

Every knob of a run lives here, so a run is reproduced by its saved `run_config.yaml` alone.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import yaml

from scalegrow.core.config import ModelConfig
from scalegrow.core.typed import coerce, load_yaml_mapping
from scalegrow.errors import InputError
from scalegrow.formats import registry as formats
from scalegrow.methods import registry as methods
from scalegrow.methods.options import check as check_options
from scalegrow.train.distill import DistillConfig
from scalegrow.write.destination import overlap


@dataclass
class OutputConfig:
    dir: str = "runs/default"


@dataclass
class DataConfig:
    corpus: str = "embedded"  # "embedded", a text/json/parquet file, or a preprocessed .bin/.idx prefix
    tokenizer: str | None = None  # sentencepiece model or HF tokenizer.json; None: init.from's, else trained
    vocab_size: int = 512  # when training the tokenizer
    seq_length: int = 128
    valid_fraction: float = 0.05  # documents held out for val/loss
    max_corpus_bytes: int = 4_000_000  # cap on the embedded corpus


@dataclass
class TrainConfig:
    steps: int = 30
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    seed: int = 1234
    save_interval: int = 10
    eval_interval: int = 10
    eval_iters: int = 4
    log_interval: int = 1
    clip_grad: float = 1.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    divergence_factor: float | None = 2.0  # stop when a loss is NaN or over this x the start's (None: never)


AUTO = "auto"


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # "cosine" (scratch) or "lemon" (grown models)
    lr: float | str = 1e-3  # peak LR; LEMON keeps the scratch peak; "auto": the source's (train/schedule.py)
    min_lr: float | str = 1e-4  # "auto": a tenth of the peak
    warmup_steps: int = 5
    decay_steps: int | None = None  # cosine: None -> train.steps
    decay_fraction: float = 0.6  # lemon: decay over this fraction of train.steps, then hold min_lr


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    bf16: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "true", "false"
    config: dict = field(default_factory=dict)  # raw DeepSpeed keys merged last


@dataclass
class InitConfig:
    # checkpoint to start from: Megatron (torch/torch_dist) or DeepSpeed; grow_pretrain grows it
    from_: str | None = None
    # pretrain: start from the Adam state init.from holds (a DeepSpeed checkpoint's, or the
    # optimizer_state.pt `scalegrow grow --optimizer-state` wrote); grow_pretrain: growth.optimizer_state
    optimizer_state: bool = False


def _growth_config() -> type:
    """The `growth` section: method, target and seed, and a section per growth method that takes
    options (`growth.ligo.steps`), made from the method's own options dataclass."""
    sections = [(name.replace("-", "_"), m.options, field(default_factory=m.options))
                for name, m in methods.METHODS.items() if m.kind == methods.GROW and m.options is not None]
    return make_dataclass("GrowthConfig", [
        ("method", str, field(default=methods.DEFAULT[methods.GROW])),
        ("target", Any, field(default=None)),  # YAML path or mapping of Megatron names (left out: the source's)
        ("seed", int, field(default=0)),
        # carry the source's Adam moments and step count through the growth (write/moments.py); the
        # source must be a DeepSpeed checkpoint (a training run's output.dir/checkpoints)
        ("optimizer_state", bool, field(default=False)),
        *sections,
    ], namespace={"options": lambda self, method: getattr(self, method.replace("-", "_"), None),
                  "sections": tuple(name for name, _, _ in sections)})


GrowthConfig = _growth_config()


@dataclass
class ExportConfig:
    tp: int = 1
    pp: int = 1
    format: str = "torch"


@dataclass
class RunConfig:
    output: OutputConfig = field(default_factory=OutputConfig)
    model: Any = None  # YAML path or mapping of Megatron names (pretrain)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    init: InitConfig = field(default_factory=InitConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # a teacher for the student trained here

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["init"]["from"] = out["init"].pop("from_")
        return out

    def model_config(self, base: ModelConfig | None = None, source: str = "model") -> ModelConfig:
        """The `model` (or `growth.target`) section as a ModelConfig: a YAML path or a mapping."""
        spec = self.model if source == "model" else self.growth.target
        if spec is None:
            if base is None:
                raise InputError(f"{source}: missing (a YAML file or a mapping of Megatron names)")
            return base
        if isinstance(spec, str):
            return ModelConfig.from_yaml(spec, base=base)
        try:
            return ModelConfig.from_dict(spec, base=base)
        except ValueError as exc:
            raise InputError(f"{source}.{exc}") from exc


def _field_name(key: str) -> str:
    return "from_" if key == "from" else key


def _build(cls, data: Any, where: str):
    """`where` is the dotted key path so far (errors say `file: train.steps: ...`)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values = {}
    for key, value in data.items():
        name = _field_name(key)
        if name not in known:
            shown = sorted(k if k != "from_" else "from" for k in known)
            raise InputError(f"{_join(where, key)}: unknown key (known: {', '.join(shown)})")
        values[name] = _coerce(hints[name], value, _join(where, key))
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where)
    return coerce(hint, value, where)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=30` -> (['train', 'steps'], 30); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InputError(f"{text}: overrides look like dotted.key=value")
    return key.split("."), yaml.safe_load(raw) if raw else None


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = load_yaml_mapping(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise InputError(f"{text}: {key} is not a section")
        node[keys[-1]] = value
    try:
        cfg = _build(RunConfig, data, "")
        validate(cfg)
    except InputError as exc:
        raise InputError(f"{path or 'config'}: {exc}") from exc
    return cfg


def validate(cfg: RunConfig) -> None:
    checks = [
        (cfg.schedule.name in ("cosine", "lemon"), "schedule.name", "must be cosine or lemon"),
        (cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3"),
        (cfg.deepspeed.bf16 in ("auto", "true", "false"), "deepspeed.bf16", "must be auto, true or false"),
        (cfg.train.steps >= 0, "train.steps", "must be >= 0"),
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1"),
        (cfg.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1"),
        (cfg.train.save_interval >= 1 and cfg.train.eval_interval >= 1, "train.save_interval",
         "save_interval and eval_interval must be >= 1"),
        (0.0 < cfg.data.valid_fraction < 1.0, "data.valid_fraction", "must be in (0, 1)"),
        (cfg.data.seq_length >= 2, "data.seq_length", "must be >= 2"),
        (cfg.export.format in formats.writable(), "export.format", f"must be one of {', '.join(formats.writable())}"),
        (cfg.growth.method in methods.names(methods.GROW), "growth.method",
         f"must be one of {', '.join(methods.names(methods.GROW))}"),
        (cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0 (0: no warmup, e.g. with "
         "growth.optimizer_state)"),
        (0.0 < cfg.schedule.decay_fraction <= 1.0, "schedule.decay_fraction", "must be in (0, 1]"),
        (cfg.schedule.lr == AUTO or isinstance(cfg.schedule.lr, float), "schedule.lr", "must be a number or auto"),
        (cfg.schedule.min_lr == AUTO or isinstance(cfg.schedule.min_lr, float), "schedule.min_lr",
         "must be a number or auto"),
        (cfg.train.divergence_factor is None or cfg.train.divergence_factor > 1.0, "train.divergence_factor",
         "must be above 1 (or null: no guard)"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise InputError(f"{key}: {message}")
    cfg.distill.check()
    for name in cfg.growth.sections:
        check_options(getattr(cfg.growth, name), lambda key: f"growth.{name}.{key}")
    relation = overlap(cfg.init.from_, cfg.output.dir) if cfg.init.from_ else None
    if relation:
        raise InputError(f"init.from: {cfg.init.from_} {relation} output.dir {cfg.output.dir}, which this run "
                         f"writes; a source is only ever read, so train into another output.dir")


def save_run_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
