"""The pack's file error, in a module of its own so that ``storage`` and ``paths`` can both use it without importing
each other in a circle (``storage`` re-exports it: ``spell_core.storage.StorageError`` is this class)."""


class StorageError(ValueError):
    """A file that cannot be used; the message says which file and why."""
