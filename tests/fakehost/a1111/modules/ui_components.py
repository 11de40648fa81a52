"""Stand-in for modules/ui_components.py: small gradio components the webui's own UI uses.

On Forge ``InputAccordion`` is a factory function returning ``InputAccordionImpl`` (so ``isinstance``
checks against ``InputAccordion`` fail there), and ``ToolButton`` takes ``value`` first like ``gr.Button``.
"""
from __future__ import annotations

import itertools

import gradio as gr
from modules._variant import FLAGS


class FormComponent:
    def get_expected_parent(self):
        return gr.components.Form


class ToolButton(FormComponent, gr.Button):
    """A small square button holding one symbol."""

    def __init__(self, value="", *args, **kwargs):
        self.tooltip = kwargs.pop("tooltip", None)  # the webui teaches every component a tooltip
        classes = kwargs.pop("elem_classes", [])
        super().__init__(value, *args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class FormRow(FormComponent, gr.Row):
    def get_block_name(self):
        return "row"


class FormColumn(FormComponent, gr.Column):
    def get_block_name(self):
        return "column"


class FormGroup(FormComponent, gr.Group):
    def get_block_name(self):
        return "group"


class FormHTML(FormComponent, gr.HTML):
    def get_block_name(self):
        return "html"


class DropdownMulti(FormComponent, gr.Dropdown):
    def __init__(self, **kwargs):
        super().__init__(multiselect=True, **kwargs)

    def get_block_name(self):
        return "dropdown"


class DropdownEditable(FormComponent, gr.Dropdown):
    def __init__(self, **kwargs):
        super().__init__(allow_custom_value=True, **kwargs)

    def get_block_name(self):
        return "dropdown"


_accordion_ids = itertools.count()


class _CheckboxAccordion(gr.Checkbox):
    """A hidden checkbox (the value scripts receive) plus an accordion; entered as a context manager."""

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or f"input-accordion-{next(_accordion_ids)}"
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=value, elem_id=self.accordion_id)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"


if FLAGS.forge:
    class InputAccordionImpl(_CheckboxAccordion):
        pass

    def InputAccordion(value=None, setup=False, **kwargs):
        return InputAccordionImpl(value=value, **kwargs)
else:
    class InputAccordion(_CheckboxAccordion):
        pass
