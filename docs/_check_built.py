"""Checks the built documentation's tables (run by ``make docs`` after Sphinx).

    python docs/_check_built.py [docs/_build]

Fails (exit 1, one line per problem) when

* a notebook page whose executed notebook (``_build/jupyter_execute/<page>.ipynb``)
  displays a Markdown table (a ``text/markdown`` output with a ``|---|`` row),
  or a page of ``MUST_HOLD_TABLE``, has fewer ``<table>`` elements in its cell
  outputs than such outputs (at least one): the Markdown was rendered as text
  (myst-nb's ``nb_render_markdown_format`` left at ``commonmark``);
* a built page shows a raw Markdown table as text: a line that is a
  ``|---|---|`` separator row (dashes, or the en/em dashes Sphinx's
  smartquotes turns them into) in prose, or anywhere in a cell's output
  (a notebook that prints a Markdown report). Code blocks and the cells'
  source are not looked at.

Only the standard library (html.parser, json).
"""

import html.parser
import json
import os
import re
import sys

# Pages (docnames) that must hold a rendered table in their cell outputs,
# whether or not the executed notebooks are there to say so.
MUST_HOLD_TABLE = ("tutorials/small_benchmark",)

# The alignment row of a Markdown table: |---|:--:|--- ... (at least one cell).
_DASH = "-\u2013\u2014"
SEPARATOR_ROW = re.compile(rf"^\s*\|(\s*:?[{_DASH}]+:?\s*\|)+\s*(:?[{_DASH}]+:?\s*)?$")
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}
_BLOCK = {"p", "div", "pre", "li", "tr", "td", "th", "br", "h1", "h2", "h3", "h4", "h5", "h6",
          "dt", "dd", "blockquote", "section", "table", "ul", "ol"}
_HIDDEN_OUTPUT_TAGS = {"remove-output", "remove-cell", "hide-output", "remove_output",
                       "remove_cell"}


class _Page(html.parser.HTMLParser):
  """The text of a page, in two parts: prose (outside code, cell inputs and
  scripts) and cell outputs; and the number of tables in cell outputs."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.stack = []  # (tag, kind): kind "skip", "output" or None
    self.prose, self.outputs = [], []
    self.tables_in_outputs = 0

  def _inside(self, kind):
    return any(k == kind for _, k in self.stack)

  def handle_starttag(self, tag, attrs):
    classes = (dict(attrs).get("class") or "").split()
    if tag in _BLOCK:
      self._text("\n")
    if tag == "table" and self._inside("output"):
      self.tables_in_outputs += 1
    if tag in _VOID:
      return
    kind = None
    if tag in ("script", "style", "code", "pre", "textarea") or "cell_input" in classes:
      kind = "skip"
    elif "cell_output" in classes:
      kind = "output"
    self.stack.append((tag, kind))

  def handle_startendtag(self, tag, attrs):
    if tag in _BLOCK:
      self._text("\n")

  def handle_endtag(self, tag):
    if tag in _BLOCK:
      self._text("\n")
    for i in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed elements
      if self.stack[i][0] == tag:
        del self.stack[i:]
        break

  def handle_data(self, data):
    self._text(data)

  def _text(self, data):
    if self._inside("output"):
      self.outputs.append(data)  # printed text in <pre> included
    elif not self._inside("skip"):
      self.prose.append(data)


def _raw_rows(text):
  return [line.strip() for line in "".join(text).splitlines() if SEPARATOR_ROW.match(line)]


def _markdown_tables(notebook_path):
  """How many shown text/markdown outputs of the executed notebook hold a table."""
  with open(notebook_path, encoding="utf-8") as f:
    nb = json.load(f)
  count = 0
  for cell in nb.get("cells", []):
    if cell.get("cell_type") != "code":
      continue
    if _HIDDEN_OUTPUT_TAGS & set(cell.get("metadata", {}).get("tags", [])):
      continue
    for out in cell.get("outputs", []):
      md = out.get("data", {}).get("text/markdown")
      if md is None:
        continue
      md = "".join(md) if isinstance(md, list) else md
      if any(SEPARATOR_ROW.match(line) for line in md.splitlines()):
        count += 1
  return count


def check(build):
  html_dir = os.path.join(build, "html")
  executed = os.path.join(build, "jupyter_execute")
  if not os.path.isdir(html_dir):
    return [f"{html_dir}: no built HTML (run make docs)"]
  problems = []
  expected = {name: 1 for name in MUST_HOLD_TABLE}  # docname -> tables its outputs must hold
  for root, _, files in os.walk(executed):
    for name in sorted(files):
      if name.endswith(".ipynb"):
        path = os.path.join(root, name)
        doc = os.path.relpath(path, executed)[:-len(".ipynb")].replace(os.sep, "/")
        n = _markdown_tables(path)
        if n:
          expected[doc] = max(expected.get(doc, 0), n)
  pages = 0
  for root, dirs, files in os.walk(html_dir):
    dirs[:] = sorted(d for d in dirs if d not in ("_sources", "_static", "_modules", "_images"))
    for name in sorted(files):
      if not name.endswith(".html"):
        continue
      path = os.path.join(root, name)
      doc = os.path.relpath(path, html_dir)[:-len(".html")].replace(os.sep, "/")
      page = _Page()
      with open(path, encoding="utf-8") as f:
        page.feed(f.read())
      page.close()
      pages += 1
      for where, text in (("as text", page.prose), ("in a cell's output", page.outputs)):
        rows = _raw_rows(text)
        if rows:
          problems.append(f"{path}: {len(rows)} raw Markdown table row(s) {where}, "
                          f"e.g. {rows[0]!r}")
      want = expected.pop(doc, 0)
      if page.tables_in_outputs < want:
        problems.append(f"{path}: its notebook displays {want} Markdown table(s), its cell "
                        f"outputs hold {page.tables_in_outputs} <table> (rendered as text? "
                        f"see nb_render_markdown_format in docs/conf.py)")
  for doc in sorted(expected):
    problems.append(f"{os.path.join(html_dir, doc)}.html: not built (it must hold a table)")
  if not problems:
    print(f"docs/_check_built.py: {pages} pages, tables rendered, no raw Markdown table rows")
  return problems


def main(argv):
  build = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "_build")
  problems = check(build)
  for line in problems:
    print("error:", line, file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
