"""The beartype configuration every public boundary of the package uses (`@typechecked`)."""

from __future__ import annotations

from beartype import BeartypeConf, beartype

# accept ints where floats are annotated (gamma=1, beta=1, ...), as PEP 484 intends
typechecked = beartype(conf=BeartypeConf(is_pep484_tower=True))
