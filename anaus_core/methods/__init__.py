"""Pre-training methods behind one interface (``base.PretrainMethod``) and their registry."""

from __future__ import annotations

from typing import Callable

from anaus_core.config import ConfigError
from anaus_core.methods.base import PretrainMethod


def _build_anaus(config) -> PretrainMethod:
    from anaus_core.methods.anaus import build_anaus_method

    return build_anaus_method(config)


def _build_avit(config) -> PretrainMethod:
    # the A-ViT method lives in its own module (anaus_core/methods/avit*); imported lazily so
    # that AnaUS runs do not import timm
    from anaus_core.methods.avit import build_avit_method  # type: ignore[import-not-found]

    return build_avit_method(config)


#: method name -> builder taking the whole ``PretrainConfig``
METHOD_BUILDERS: dict[str, Callable[..., PretrainMethod]] = {"anaus": _build_anaus, "avit": _build_avit}


def method_names() -> list[str]:
    return sorted(METHOD_BUILDERS)


def build_method(config) -> PretrainMethod:
    """The method named by ``config.method`` (``"anaus"`` default, ``"avit"``)."""
    name = getattr(config, "method", "anaus")
    if name not in METHOD_BUILDERS:
        raise ConfigError(f"method: {name!r} is not a pre-training method ({', '.join(method_names())})")
    return METHOD_BUILDERS[name](config)


__all__ = ["METHOD_BUILDERS", "PretrainMethod", "build_method", "method_names"]
