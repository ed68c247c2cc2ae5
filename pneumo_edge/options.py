"""The runtime's choices, defaults and bounds, defined once.

The library checks its arguments against these; the CLI builds its options (and
their help) from them. A leaf module, cheap to import: ``pneumo-edge --help``
reads it without loading OpenCV or onnxruntime.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Device", "FlaggedAs", "Engine", "RayDecode", "Bound", "BATCH_SIZE", "ACTORS",
           "REPORT_LIMIT", "SHOW", "WORKERS", "THREADS", "BENCH_SECONDS", "BENCH_BATCH_SIZES",
           "choices", "described"]


class Device(str, Enum):
    """auto: CUDA only if it really loads, else CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class FlaggedAs(str, Enum):
    """warn: flagged images (input checks, out of distribution) keep their prediction with
    warnings; fail: they become failures."""

    warn = "warn"
    fail = "fail"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class RayDecode(str, Enum):
    """decode in the model actors (fastest on one node) or in separate Ray tasks (CPU nodes
    decode, GPU nodes infer)."""

    actors = "actors"
    tasks = "tasks"


def choices(enum: type[Enum]) -> tuple[str, ...]:
    """The values of a choice enum, in order."""
    return tuple(e.value for e in enum)


class Bound:
    """A default with its allowed range (inclusive; None: open)."""

    def __init__(self, default, lo=None, hi=None):
        self.default, self.lo, self.hi = default, lo, hi

    def check(self, name: str, value) -> None:
        """Raises ValueError naming ``--name`` when ``value`` is out of range."""
        if value is None:
            return
        if (self.lo is not None and value < self.lo) or (self.hi is not None
                                                         and value > self.hi):
            rng = f"{self.lo if self.lo is not None else ''}..{self.hi if self.hi is not None else ''}"
            raise ValueError(f"--{name.replace('_', '-')} must be in {rng}, got {value!r}")


def described(texts: dict[str, str], defaults: dict, choices: dict | None = None,
              ranges: dict | None = None) -> dict[str, str]:
    """Help texts for ``--help`` with the choices, ranges and defaults appended (plain text;
    a True default reads "on", False and None defaults and required arguments are left
    out)."""
    import inspect

    out = {}
    for name, text in texts.items():
        extra = ["one of " + ", ".join(choices[name])] if choices and name in choices else []
        extra += [ranges[name]] if ranges and name in ranges else []
        value = defaults.get(name)
        if value is inspect.Parameter.empty:  # a required argument has no default
            value = None
        if value is True:
            extra.append("default on")
        elif value not in (None, False, ()):
            extra.append(f"default {value}")
        out[name] = text + (f" ({'; '.join(extra)})" if extra else "")
    return out


#: Images per model run (a batch of 1024 180-px images is 400 MB of input).
BATCH_SIZE = Bound(8, 1, 1024)
#: Decoding threads (default: CPU count, at most 8). Each may hold one decoded image of up
#: to 64 MiB (larger decodes take a process-wide lock), so this caps that term of the
#: memory bound at 64 x 64 MiB.
WORKERS = Bound(None, 1, 64)
#: onnxruntime intra-op threads (default: physical cores).
THREADS = Bound(None, 1, 1024)
#: Ray model actors (one onnxruntime session each).
ACTORS = Bound(2, 1, 4096)
#: Above this many files, report.json and report.html keep aggregates only.
REPORT_LIMIT = Bound(50_000, 1)
#: Rows of per-image results printed when files are written.
SHOW = Bound(20, 0)
#: benchmark: minimum timing per batch size and model, and the batch sizes timed.
BENCH_SECONDS = Bound(1.0, 0.0)
BENCH_BATCH_SIZES = (1, 8, 32)
