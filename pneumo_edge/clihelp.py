"""How the CLI's help is printed: literally, and with option texts the library writes.

Typer renders help with rich markup, so a help text quoting ``pip install
'pneumo-edge[scale]'`` lost its ``[scale]``; and it writes ``<bool>`` as the type of
a flag, which takes no value. :class:`Command` fixes both for every command.
"""

from __future__ import annotations

import importlib

from typer.core import TyperCommand

__all__ = ["Command", "library_help"]


class Command(TyperCommand):
    """Help printed literally: the texts are escaped for rich (``pip install
    'pneumo-edge[scale]'`` keeps its brackets; they were eaten as markup), and flags
    show no type (typer writes ``<bool>`` for a flag, which takes no value)."""

    def format_help(self, ctx, formatter):
        from rich.markup import escape

        params = self.get_params(ctx)
        saved = (self.help, [(p, getattr(p, "help", None)) for p in params])
        try:
            self.help = self.help and escape(self.help)
            for param in params:
                if getattr(param, "help", None):
                    param.help = escape(param.help)
                if getattr(param, "is_flag", False):
                    param.display_type_rich = lambda ctx: None
            return super().format_help(ctx, formatter)
        finally:
            self.help = saved[0]
            for param, text in saved[1]:
                if text is not None:
                    param.help = text


def library_help(helper: str) -> type[TyperCommand]:
    """A command whose option help (meaning, choices, defaults) the training library
    writes (``module:function``), read only when ``--help`` is shown."""
    class LibraryHelp(Command):
        def format_help(self, ctx, formatter):
            module, function = helper.split(":")
            try:
                texts = getattr(importlib.import_module(module), function)()
            except ImportError:  # no training side installed: the plain help
                texts = {}
            for param in self.params:
                param.help = texts.get(param.name, param.help)
            return super().format_help(ctx, formatter)

    return LibraryHelp
