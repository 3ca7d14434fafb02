"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations


class VlmtuneError(Exception):
    """A problem the user can fix. The message names the file, line or field and says what to do."""

    exit_code = 2


class ConfigError(VlmtuneError):
    """Every problem found in a configuration, reported at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} configuration problem(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(VlmtuneError):
    """The data set has problems; the message lists them with file and line numbers."""


class MissingDependencyError(VlmtuneError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package '{package}', which is not installed. "
            f"Install it with: pip install 'vlmtune[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional heavy dependency lazily, with an error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, extra, purpose) from exc
