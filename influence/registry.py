"""One registry of named classes (solvers, estimators) for the command line and string options.

The typed front door is the classes themselves (their constructors name, document and
validate every option); a registry only maps a name to its class::

    SOLVERS.create("cg", tol=1e-8)       # == CGSolver(tol=1e-8)
    SOLVERS.create(CGSolver(tol=1e-8))   # an instance passes through
"""
from __future__ import annotations


class Registry:
    """Named classes of one kind (``what``: "solver", "estimator"), each with a ``name`` attribute."""

    def __init__(self, what: str, base: type):
        self.what = what
        self.base = base
        self._classes: dict[str, type] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:Class", imported on first use

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"module:Class"`` under ``name`` without importing it now (a class of a
        module that itself imports the registry's package)."""
        self._lazy[name] = target

    def _resolve(self) -> None:
        import importlib

        while self._lazy:
            name, target = self._lazy.popitem()
            module, attr = target.split(":")
            self.register(getattr(importlib.import_module(module), attr))

    def register(self, cls: type) -> type:
        name = cls.name
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.what} name {name!r} is taken by {self._classes[name].__name__}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(set(self._classes) | set(self._lazy))

    def __getitem__(self, name: str) -> type:
        self._resolve()
        return self._classes[name]

    def __contains__(self, name) -> bool:
        return name in self._classes or name in self._lazy

    def __iter__(self):
        self._resolve()
        return iter(self._classes)

    def items(self):
        self._resolve()
        return self._classes.items()

    def __len__(self):
        return len(self._classes) + len(self._lazy)

    def create(self, spec, **options):
        """An instance from a name and its options, or ``spec`` itself when it is an instance."""
        if isinstance(spec, self.base):
            if options:
                raise ValueError(f"pass options either to the {self.what} instance or here, not both")
            return spec
        self._resolve()
        try:
            cls = self._classes[spec]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.what} {spec!r}; choose one of {self.names()}") from None
        return cls(**options)
