"""Adaptation methods: functions that change a model from outside (the model file never knows).

`apply_method(model, options)` is what training commands call; options come from the
`method:` section of a recipe or `--method NAME --method.KEY VALUE` on the command line.
"""

from __future__ import annotations

from tunelab.errors import ConfigError, closest

METHODS = ("full", "lora", "qlora", "freeze")


def apply_method(model, options: dict) -> list:
    """Apply the method in place; returns the loop callbacks it needs (e.g. gradual unfreezing)."""
    options = dict(options or {})
    name = options.pop("name", "full")
    if name not in METHODS:
        raise ConfigError(
            f"method {name!r}{closest(name, METHODS)}; expected one of {', '.join(METHODS)}"
        )
    if name == "full":
        if options:
            raise ConfigError(f"method full takes no options, got {', '.join(options)}")
        return []
    if name == "freeze":
        from tunelab.adapt.freeze import freeze_method

        return freeze_method(model, options)
    if name in ("lora", "qlora"):
        from tunelab.adapt.lora import lora_method

        return lora_method(model, options, quantized=name == "qlora")
    raise ConfigError(f"method {name!r} is not available yet")
