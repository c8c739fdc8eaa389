"""Config, the whole typed config: its sections, read from a TOML preset (a file or a shipped name) or JSON,
with dotted command-line overrides applied, and validated."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import ConfigError
from .coerce import _RAW, _coerce
from .model import ModelConfig
from .sections import DataConfig, DistributedConfig, DPOConfig, LoRAConfig, TrainConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> "Config":
        for section in (self.model, self.data, self.train, self.dpo, self.distributed, self.lora):
            section.validate()
        if self.lora.enabled and self.lora.base_dtype == "bf16" and self.train.precision != "bf16":
            raise ConfigError("lora.base_dtype=bf16 computes through autocast: set train.precision=bf16")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a config must be a table/object of sections, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if name not in sections:
                raise ConfigError(f"{where}: unknown section {name!r} (valid: {', '.join(sections)})")
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{name}] must be a table")
            kwargs[name] = _section_from_dict(_SECTION_TYPES[name], value, name)
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "Config":
        """Read a TOML preset (or the defaults when `path` is None) and apply dotted overrides."""
        d: dict = {}
        if path is not None:
            path = resolve_preset(path)
            if not _is_file(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                d = tomllib.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError, OSError) as e:  # TOMLDecodeError, bad UTF-8, absurd nesting
                raise ConfigError(f"{path}: not valid TOML ({type(e).__name__}: {e})") from None
        return cls.from_dict(_with_overrides(d, overrides), where=str(path) if path else "config")

    def with_overrides(self, overrides: list[str]) -> "Config":
        return Config.from_dict(_with_overrides(self.to_dict(), overrides)) if overrides else self

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | Path) -> "Config":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from None
        return cls.from_dict(d, where=str(path))


PRESETS = Path(__file__).resolve().parent.parent / "configs"  # src/llama4dpo/configs


def resolve_preset(path: str | Path) -> Path:
    """A file path, or the name of a shipped preset ("tiny", "demo", "llama4-100m")."""
    path = Path(path)
    if not _is_file(path) and path.parent == Path(".") and _is_file(PRESETS / f"{path.stem}.toml"):
        return PRESETS / f"{path.stem}.toml"
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        return False


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "dpo": DPOConfig,
                  "distributed": DistributedConfig, "lora": LoRAConfig}


def _with_overrides(d: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"override {item!r}: {section!r} is not a section")
        d[section][name] = _RAW(value)  # parsed against the field's type in from_dict
    return d


def parse_override(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or "." not in key or not key.split(".", 1)[1]:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. model.num_local_experts=16")
    return key, value.strip()


def _section_from_dict(cls, d: dict, section: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)
