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

    def register(self, cls: type) -> type:
        name = cls.name
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.what} name {name!r} is taken by {self._classes[name].__name__}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def __contains__(self, name) -> bool:
        return name in self._classes

    def __iter__(self):
        return iter(self._classes)

    def items(self):
        return self._classes.items()

    def __len__(self):
        return len(self._classes)

    def create(self, spec, **options):
        """An instance from a name and its options, or ``spec`` itself when it is an instance."""
        if isinstance(spec, self.base):
            if options:
                raise ValueError(f"pass options either to the {self.what} instance or here, not both")
            return spec
        try:
            cls = self._classes[spec]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.what} {spec!r}; choose one of {self.names()}") from None
        return cls(**options)
