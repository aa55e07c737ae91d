"""SDK tests: the ``msbx`` package from sdk/src (installed editable by ``make test``; found on
the path here when it is not installed)."""

import sys
from pathlib import Path

try:
    import msbx  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sdk" / "src"))
