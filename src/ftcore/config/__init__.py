"""Config files as `_component_` graphs: load, override, validate, instantiate."""

from ftcore.config.errors import ConfigError
from ftcore.config.instantiate import instantiate, locate
from ftcore.config.loading import apply_overrides, builtin_config_names, load_config, resolve_config_path
from ftcore.config.validate import validate_config

__all__ = [
    "ConfigError",
    "apply_overrides",
    "builtin_config_names",
    "instantiate",
    "load_config",
    "locate",
    "resolve_config_path",
    "validate_config",
]
