"""Imported first by both notebooks: keep this folder from shadowing the `workbench` package.

This folder holds notebooks/workbench.py, named like the package. `marimo run|edit` put a notebook's folder on
sys.path, and so does `python notebooks/<file>.py`; then `import workbench` would find the notebook, not the
package. This module is importable exactly then, and on import takes the folder off sys.path again (and drops
a notebook already imported under the package's name). A notebook loaded by its path (the tests) has nothing
to repair and does not find this module.
"""

import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != FOLDER]  # "" is the working directory
if os.path.dirname(os.path.abspath(getattr(sys.modules.get("workbench"), "__file__", None) or "/")) == FOLDER:
    del sys.modules["workbench"]
