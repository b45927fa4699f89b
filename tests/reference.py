"""Where the shared reference vectors are: ``shared/`` inside the checkout or beside it (CI's layout)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_dir(*parts: str) -> Path:
    """shared/reference/<parts>, looked up in the checkout, then beside it; the first candidate if neither."""
    candidates = [base / "shared" / "reference" / Path(*parts) for base in (ROOT, ROOT.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[-1])
