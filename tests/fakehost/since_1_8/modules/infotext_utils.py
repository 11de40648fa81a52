"""modules.infotext_utils (1.8+): the new name of generation_parameters_copypaste, plus PasteField."""
from __future__ import annotations

from collections import namedtuple

from modules.generation_parameters_copypaste import (  # noqa: F401
    add_paste_fields,
    connect_paste,
    parse_generation_parameters,
    paste_fields,
    paste_values,
    quote,
    register_paste_params_button,
    registered_param_bindings,
    unquote,
)


class PasteField(namedtuple("PasteField", ["component", "target", "api"])):
    def __new__(cls, component, target, api=None):
        return super().__new__(cls, component, target, api)
