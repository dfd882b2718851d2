"""Sphinx configuration of the bnjax documentation (``make docs``)."""

import os
import sys

import bnjax
from bnjax import _map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the notebooks import experiments/

project = "bnjax"
release = version = bnjax.__version__
copyright = "2026, the bnjax authors"
author = "the bnjax authors"  # the pages' footer ("By ...")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute",
                    "_module_map.md",  # included by api.md
                    "_check_built.py"]  # make docs' check of the built pages' tables
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The API pages: one per module of the map, every name of its __all__.
autodoc_default_options = {"member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "none"  # signatures stay readable; types are in the docstrings
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_use_ivar = True  # dataclass fields are documented once, as members
add_module_names = False

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# Notebooks are executed when their content changes (myst-nb's "cache" mode:
# the outputs of an unchanged notebook come from a jupyter-cache database
# outside docs/_build, so `make docs`, which empties _build, keeps it); an
# error in a cell fails the build. BNJAX_DOCS_CACHE=off executes every build
# (myst-nb's "force"); another value is the cache folder.
_cache = os.environ.get("BNJAX_DOCS_CACHE") or os.path.join(ROOT, ".cache", "jupyter")
if _cache.lower() in ("off", "0", "none"):
  nb_execution_mode = "force"
else:
  nb_execution_mode = "cache"
  nb_execution_cache_path = _cache
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# A notebook's text/markdown outputs (IPython.display.Markdown, e.g. the
# benchmark's report) are parsed as GitHub-flavoured Markdown, so their
# tables become HTML tables; myst-nb's default, "commonmark", has no tables
# and shows the rows as text. docs/_check_built.py (make docs) checks it.
nb_render_markdown_format = "gfm"

html_theme = "sphinx_book_theme"
html_title = "bnjax"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}

# A broken cross-reference is an error (sphinx -n); types outside bnjax
# (no network, so no intersphinx inventories) are not checked.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|nn|flax|optax|orbax|ott|ml_collections|absl|matplotlib|typing|"
     r"collections|os|Any|Callable|Sequence|Mapping|Literal|Iterable|Iterator|PRNGKey|Array|"
     r"ArrayLike|Path|PathLike|dataclasses|enum|functools)(\..*)?"),
    (r"py:.*", r"(int|float|str|bool|dict|list|tuple|None|object|type|bytes|callable|optional)"),
    # the types napoleon reads from "Returns:" lines written as prose or shapes
    (r"py:class", r".*[^\w.].*"),
    (r"py:class", r"[a-z_0-9]+"),
]


def _write_api_pages(app):
  """docs/api/<module>.md for every module of the map, one entry per name of
  its ``__all__`` (generated; not in git)."""
  import inspect

  folder = os.path.join(app.srcdir, "api")
  os.makedirs(folder, exist_ok=True)
  for name, idea in _map.MODULES:
    module = getattr(bnjax, name)
    entries = []
    for public in module.__all__:
      obj = getattr(module, public)
      target = f"bnjax.{name}.{public}"
      if inspect.isclass(obj) and not getattr(obj, "__origin__", None):
        entries.append(f".. autoclass:: {target}\n   :members:\n   :undoc-members:\n")
      elif inspect.isfunction(obj) or inspect.isbuiltin(obj) or (
          callable(obj) and not inspect.isclass(obj) and hasattr(obj, "__wrapped__")):
        entries.append(f".. autofunction:: {target}\n")
      else:
        entries.append(f".. autodata:: {target}\n")
    text = (f"# bnjax.{name}\n\n{idea[0].upper() + idea[1:]}.\n\n"
            f"```{{eval-rst}}\n.. automodule:: bnjax.{name}\n   :no-members:\n\n"
            + "\n".join(entries) + "```\n")
    path = os.path.join(folder, f"{name}.md")
    if not os.path.exists(path) or open(path).read() != text:
      with open(path, "w") as f:
        f.write(text)
  rows = "\n".join(f"| [`bnjax.{n}`](api/{n}.md) | {idea} |" for n, idea in _map.MODULES)
  toc = "\n".join(f"api/{n}" for n, _ in _map.MODULES)
  text = ("| module | what it holds |\n|---|---|\n" + rows + "\n\n```{toctree}\n:hidden:\n\n"
          + toc + "\n```\n")
  path = os.path.join(app.srcdir, "_module_map.md")
  if not os.path.exists(path) or open(path).read() != text:
    with open(path, "w") as f:
      f.write(text)


def _check_every_public_name(app, env):
  """Every name of every module's ``__all__`` has an entry in the API pages."""
  from sphinx.util import logging
  documented = set(env.get_domain("py").objects)
  log = logging.getLogger("bnjax.docs")
  for name, _ in _map.MODULES:
    module = getattr(bnjax, name)
    for public in module.__all__:
      if f"bnjax.{name}.{public}" not in documented:
        log.warning(f"bnjax.{name}.{public} (in __all__) has no entry in the API pages")


def setup(app):
  app.connect("builder-inited", _write_api_pages)
  app.connect("env-updated", _check_every_public_name)
