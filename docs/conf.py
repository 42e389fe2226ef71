"""Sphinx configuration for trio-federation.

``nox -s docs`` builds with ``sphinx-build -W --keep-going``: any warning fails
the build. No network is needed (hence no intersphinx).
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import attrs
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.inspect import object_description
from sphinx.util.typing import stringify_annotation

import trio_federation

# -- Project -------------------------------------------------------------------

project = "trio-federation"
author = "the trio-federation developers"
copyright = "the trio-federation developers"
version = trio_federation.__version__
release = trio_federation.__version__

# -- General -------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
# Deliberately no sphinx.ext.intersphinx: the build must work offline. References
# to trio, attrs or the standard library render as plain code, not links.

exclude_patterns = ["_build", "examples"]
nitpicky = False
primary_domain = "py"
highlight_language = "python3"

# -- autodoc and napoleon ------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become :ivar: fields of the class rather than separate
# attribute directives, so they can never duplicate an attribute that autodoc
# also documents as a member.
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- HTML ----------------------------------------------------------------------

html_theme = "furo"
html_title = f"trio-federation {release}"

# -- Public classes that live in private modules --------------------------------
#
# trio_federation/__init__.py sets ``__module__ = "trio_federation"`` on every
# public class, so autodoc reads the *package* source to find attribute
# docstrings (the ``"""..."""`` under each attrs field) and the source order of
# members, and finds neither there. We give the package's source analyzer the
# attribute docs and definition order of the private modules the names come
# from, so fields keep their docstrings and their declaration order.


def _merge_private_analyzers(_app: Sphinx) -> None:
    package = ModuleAnalyzer.for_module("trio_federation")
    package.analyze()
    offset = max(package.tagorder.values(), default=0) + 1
    # Every private module the package imported (the ones public names come from).
    private_modules = sorted(name for name in sys.modules if name.startswith("trio_federation._"))
    for modname in private_modules:
        private = ModuleAnalyzer.for_module(modname)
        private.analyze()
        for key, doc in private.attr_docs.items():
            package.attr_docs.setdefault(key, doc)
        for name, order in private.tagorder.items():
            package.tagorder.setdefault(name, order + offset)
        for key, annotation in private.annotations.items():
            package.annotations.setdefault(key, annotation)
        offset += max(private.tagorder.values(), default=0) + 1


# -- Readable signatures ---------------------------------------------------------
#
# attrs generates __init__: its defaults for factory fields show as ``NOTHING``
# and converted fields lose their annotation. Rebuild the signature of each attrs
# class from its fields instead: ``name: type = default``, with
# ``datetime.now(UTC)`` for a timestamp taken when the object is made.


def _attrs_signature(cls: type[Any]) -> str:
    parts: list[str] = ["*"]
    for field in attrs.fields(cls):
        text = f"{field.name}: {stringify_annotation(field.type, 'smart')}"
        default = field.default
        if isinstance(default, attrs.Factory):
            name = default.factory.__name__
            text += " = datetime.now(UTC)" if name == "_now" else f" = {name}()"
        elif default is not attrs.NOTHING:
            text += f" = {object_description(default)}"
        parts.append(text)
    return "(" + ", ".join(parts) + ")"


def _process_signature(
    _app: Sphinx,
    what: str,
    _name: str,
    obj: Any,
    _options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    if what == "class" and inspect.isclass(obj) and attrs.has(obj):
        return _attrs_signature(obj), return_annotation
    if signature and "task_status" in signature:
        # trio's sentinel has an unhelpful repr; show the name users know.
        signature = re.sub(
            r"(task_status: [^=]+= )[^,)]+", r"\1trio.TASK_STATUS_IGNORED", signature
        )
        return signature, return_annotation
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("builder-inited", _merge_private_analyzers)
    app.connect("autodoc-process-signature", _process_signature)
    return {"parallel_read_safe": True}
