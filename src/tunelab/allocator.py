"""Moved to tunelab.runtime.allocator; kept for the bench scripts."""

from tunelab.runtime.allocator import MALLOC_ENV, keep_freed_memory, reexec

__all__ = ["MALLOC_ENV", "keep_freed_memory", "reexec"]
