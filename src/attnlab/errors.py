"""One exception type for bad user input: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Input the user can fix: a missing file, a bad config key, an over-long sequence..."""


def require_file(path, what: str = "file"):
    """Return `path` as a Path if it names a non-empty file or folder, else raise UserError."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_file() and p.stat().st_size == 0:
        raise UserError(f"{what} is empty: {p}")
    return p
