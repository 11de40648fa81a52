"""modules.options: OptionInfo, options_section and Options with the default fallback in __getattr__."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modules._variant import FLAGS


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 **newer):
        """``category_id`` exists from 1.7 on; 1.6 refuses it like any unknown keyword."""
        unknown = set(newer) - ({"category_id"} if FLAGS.option_categories else set())
        if unknown:
            raise TypeError(f"OptionInfo.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if FLAGS.option_categories:
            self.category_id = newer.get("category_id")
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):
        self.comment_after += html
        return self

    def needs_restart(self):
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


def options_section(section_identifier: tuple, options_dict: dict) -> dict:
    """Set the section of every option in ``options_dict``; from 1.7 a 3-tuple's last item is the category."""
    section, category = section_identifier, None
    if FLAGS.option_categories and len(section_identifier) == 3:
        section, category = section_identifier[:2], section_identifier[2]
    for value in options_dict.values():
        value.section = section
        if category is not None:
            value.category_id = category
    return options_dict


class Options:
    typemap = {int: float}

    def __init__(self, data_labels: dict[str, OptionInfo], restricted_opts: set[str]):
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("data", "data_labels", "restricted_opts", "typemap") or key not in self.data_labels:
            return super().__setattr__(key, value)
        self.data[key] = value

    def __getattr__(self, item: str) -> Any:
        if item in ("data", "data_labels", "restricted_opts"):
            raise AttributeError(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(f"'Options' object has no attribute '{item}'")

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        old = self.data.get(key, None)
        if old == value:
            return False
        self.data[key] = value
        info = self.data_labels.get(key)
        if run_callbacks and info is not None and info.onchange is not None:
            info.onchange()
        return True

    def get_default(self, key: str) -> Any:
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def add_option(self, key: str, info: OptionInfo) -> None:
        """1.6 only labels the option (reads fall back to its default); 1.7+ also writes the default to data."""
        self.data_labels[key] = info
        if FLAGS.option_categories and key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def onchange(self, key: str, func: Callable, call: bool = True) -> None:
        self.data_labels[key].onchange = func
        if call:
            func()

    def save(self, filename: str) -> None:
        """The stand-in keeps settings in memory only."""
